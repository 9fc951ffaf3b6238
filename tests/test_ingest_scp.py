"""The C-STORE receiver against a real sending peer: dcmtk's storescu, as a modality or PACS would send."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from data_fixtures import data_path

from edge_client.ingest.pipeline import Ingestor
from edge_client.ingest.reader import ReadConfig
from edge_client.ingest.scp import ScpConfig, StorageSCP
from edge_client.ingest.store import DatasetStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    ingestor = Ingestor(DatasetStore.create(tmp_path / "store", 28), ReadConfig(image_size=28))
    server = StorageSCP(ingestor, ScpConfig(ae_title="FEDGE", port=0, allow_ae=("CT_SCANNER",)))
    server.start()
    yield server
    server.stop()


def _send(
    storescu: str, port: int, files: list[Path], calling: str, called: str = "FEDGE", *options: str
) -> subprocess.CompletedProcess[str]:
    cmd = [storescu, "-aet", calling, "-aec", called, *options, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_storescu_series_arrive_in_the_store(scp: StorageSCP, storescu: str, data_dir: Path) -> None:
    liver = sorted(data_path(data_dir, "dicom", "ct_series_liver_3slice").glob("*.dcm"))
    head = sorted(data_path(data_dir, "ct", "ge_head_human_28slice").glob("*.dcm"))
    assert (len(liver), len(head)) == (3, 28)
    sent = _send(storescu, scp.port, liver + head, calling="CT_SCANNER")
    assert sent.returncode == 0, sent.stderr
    store = scp.ingestor.store
    assert len(store) == 31
    summary = scp.ingestor.summary()
    assert (summary.ingested, summary.quarantined) == (31, 0)
    # Sent again (a PACS retry): acknowledged, stored once.
    assert _send(storescu, scp.port, liver, calling="CT_SCANNER").returncode == 0
    assert len(store) == 31 and scp.ingestor.summary().duplicates == 3


def test_bad_dataset_over_the_network_is_quarantined_and_acknowledged(scp: StorageSCP, storescu: str, data_dir: Path) -> None:
    bad = data_path(data_dir, "bad_inputs", "bad_sequence_ct_jpegll.dcm")
    # -xs: propose JPEG Lossless SV1, the file's own syntax, so the receiver takes it compressed
    sent = _send(storescu, scp.port, [bad], "CT_SCANNER", "FEDGE", "-xs")
    assert sent.returncode == 0, sent.stderr
    assert scp.ingestor.summary().reasons == {"invalid_uid": 1}
    reasons = list((scp.ingestor.store.root / "quarantine").glob("*.reason"))
    assert len(reasons) == 1 and reasons[0].read_text().startswith("invalid_uid: ")


def test_unknown_calling_ae_is_refused(scp: StorageSCP, storescu: str, data_dir: Path) -> None:
    files = sorted(data_path(data_dir, "dicom", "ct_series_liver_3slice").glob("*.dcm"))
    refused = _send(storescu, scp.port, files, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr
    wrong_called = _send(storescu, scp.port, files, calling="CT_SCANNER", called="SOMEONE_ELSE")
    assert wrong_called.returncode != 0
    assert len(scp.ingestor.store) == 0


def test_scp_config_needs_an_allow_list() -> None:
    with pytest.raises(ValueError, match="--allow-ae"):
        ScpConfig(ae_title="FEDGE", port=11112, allow_ae=())
    with pytest.raises(ValueError, match="16 characters"):
        ScpConfig(ae_title="A_VERY_LONG_AE_TITLE", port=11112, allow_ae=("X",))
