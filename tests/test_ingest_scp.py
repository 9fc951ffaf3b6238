"""The C-STORE receiver against a real sending peer: dcmtk's storescu, as a modality or PACS would send."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from data_fixtures import data_path
from pydicom.uid import generate_uid
from test_ingest_limits import dicom_image

from edge_client.ingest.limits import Limits
from edge_client.ingest.pipeline import Ingestor
from edge_client.ingest.reader import ReadConfig
from edge_client.ingest.scp import ScpConfig, StorageSCP
from edge_client.ingest.store import DatasetStore

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    ingestor = Ingestor(DatasetStore.create(tmp_path / "store", 28), ReadConfig(image_size=28))
    server = StorageSCP(ingestor, ScpConfig(ae_title="FEDGE", port=0, allow_ae=("CT_SCANNER",)))
    server.start()
    yield server
    server.stop()


def _send(storescu: str, port: int, files: list[Path], calling: str, called: str = "FEDGE", *options: str) -> subprocess.CompletedProcess[str]:
    cmd = [storescu, "-aet", calling, "-aec", called, *options, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _statuses(sent: subprocess.CompletedProcess[str]) -> list[str]:
    """The C-STORE response statuses, in order, as storescu -d prints them."""
    return [m.strip() for m in re.findall(r"DIMSE Status\s+: (.+)", sent.stdout + sent.stderr)]


def _status(sent: subprocess.CompletedProcess[str]) -> str:
    found = _statuses(sent)
    return found[0] if len(found) == 1 else repr(found)


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


def test_bad_dataset_over_the_network_is_quarantined_and_refused(scp: StorageSCP, storescu: str, data_dir: Path) -> None:
    """A quarantined dataset is not acknowledged: the sender is told, and keeps its copy."""
    bad = data_path(data_dir, "bad_inputs", "bad_sequence_ct_jpegll.dcm")
    # -xs: propose JPEG Lossless SV1, the file's own syntax, so the receiver takes it compressed
    sent = _send(storescu, scp.port, [bad], "CT_SCANNER", "FEDGE", "-xs", "-d")
    assert sent.returncode != 0
    assert _status(sent) == "0xa901: Error: Data Set does not match SOP Class"
    assert "LO [invalid_uid]" in sent.stdout + sent.stderr  # the Error Comment names our reason
    assert scp.ingestor.summary().reasons == {"invalid_uid": 1}
    reasons = list((scp.ingestor.store.root / "quarantine").glob("*.reason"))
    assert len(reasons) == 1 and reasons[0].read_text().startswith("invalid_uid: ")


def test_corrupt_and_refused_data_fail_and_a_good_file_succeeds(scp: StorageSCP, storescu: str, tmp_path: Path, data_dir: Path) -> None:
    """In one association: pixel data shorter than its header says (cannot understand), a real MR
    image relabelled as a modality the task does not take (does not match), and a good file."""
    short = dicom_image(tmp_path / "short.dcm", 4, 4, claim={"Rows": 8})  # 16 bytes where 32 belong
    ds = pydicom.dcmread(data_path(data_dir, "dicom", "modalities", "MR_small.dcm"))
    ds.Modality = "SEG"
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "seg.dcm")
    good = data_path(data_dir, "dicom", "modalities", "MR_small.dcm")
    # --no-halt: go on after a failed store (storescu then exits 0; the statuses tell)
    sent = _send(storescu, scp.port, [short, tmp_path / "seg.dcm", good], "CT_SCANNER", "FEDGE", "-d", "--no-halt")
    assert _statuses(sent) == [
        "0xc003: Error: Cannot understand",
        "0xa903: Error: Data Set does not match SOP Class",
        "0x0000: Success",
    ]
    assert scp.ingestor.summary().reasons == {"truncated": 1, "wrong_modality": 1}
    assert len(scp.ingestor.store) == 1


def test_hostile_dimensions_are_refused_over_the_network(scp: StorageSCP, storescu: str, tmp_path: Path) -> None:
    wide = dicom_image(tmp_path / "wide.dcm", 1, 65535)
    sent = _send(storescu, scp.port, [wide], "CT_SCANNER", "FEDGE", "-d")
    assert sent.returncode != 0 and _status(sent) == "0xa710: Refused: Out of resources", _status(sent)
    assert scp.ingestor.summary().reasons == {"too_large": 1} and len(scp.ingestor.store) == 0


def test_full_quarantine_answers_out_of_resources(tmp_path: Path, storescu: str, data_dir: Path) -> None:
    ingestor = Ingestor(DatasetStore.create(tmp_path / "store", 28), ReadConfig(), quarantine_bytes=0)
    server = StorageSCP(ingestor, ScpConfig(ae_title="FEDGE", port=0, allow_ae=("CT_SCANNER",)))
    server.start()
    try:
        sent = _send(storescu, server.port, [dicom_image(tmp_path / "short.dcm", 4, 4, claim={"Rows": 8})], "CT_SCANNER", "FEDGE", "-d")
    finally:
        server.stop()
    assert sent.returncode != 0 and _status(sent) == "0xa700: Refused: Out of resources"
    assert "LO [truncated (quarantine full)]" in sent.stdout + sent.stderr
    assert (ingestor.summary().quarantined, ingestor.summary().quarantine_full) == (1, 1)
    assert not (tmp_path / "store" / "quarantine").exists()  # nothing written


def test_oversized_dataset_is_cut_off_while_it_arrives(tmp_path: Path, storescu: str, data_dir: Path) -> None:
    """The size cap holds on the network too: the association is aborted once a dataset passes it,
    and the receiver goes on serving."""
    ingestor = Ingestor(DatasetStore.create(tmp_path / "store", 28), ReadConfig(limits=Limits(max_file_bytes=200_000)))
    server = StorageSCP(ingestor, ScpConfig(ae_title="FEDGE", port=0, allow_ae=("CT_SCANNER",)))
    server.start()
    try:
        big = data_path(data_dir, "ct", "ge_head_human_28slice", "01.dcm")  # 526 kB
        cut = _send(storescu, server.port, [big], "CT_SCANNER", "FEDGE", "-v")
        small = _send(storescu, server.port, [data_path(data_dir, "dicom", "modalities", "MR_small.dcm")], "CT_SCANNER")
    finally:
        server.stop()
    assert cut.returncode != 0 and "Abort" in cut.stdout + cut.stderr, cut.stdout + cut.stderr
    assert small.returncode == 0, small.stdout + small.stderr
    assert ingestor.summary().reasons == {"too_large": 1} and len(ingestor.store) == 1


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
