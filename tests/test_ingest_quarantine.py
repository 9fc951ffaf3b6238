"""The quarantine's byte quota on the real bad inputs: what does not fit is refused, counted and
logged, never written; space freed by a person is used again; the CLI sets the quota."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import typer
from data_fixtures import data_path
from typer.testing import CliRunner

from edge_client.ingest.pipeline import Ingestor, Outcome
from edge_client.ingest.reader import ReadConfig
from edge_client.ingest.store import DatasetStore
from edge_client.ingest.watch import watch
from fedge.cli.ingest import ingest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# sizes from SOURCES.md: 9,630 + 38,871 fit in 60 kB with their reason files; 184,266 does not
SMALL, MEDIUM, LARGE = "MR_truncated.dcm", "no_meta.dcm", "bad_sequence_ct_jpegll.dcm"


def _ingestor(root: Path, quota: int) -> Ingestor:
    return Ingestor(DatasetStore.open_or_create(root, 28, 1), ReadConfig(), quarantine_bytes=quota)


def _kept(store: Path) -> list[str]:
    folder = store / "quarantine"
    return sorted(p.name.split("-", 1)[1] for p in folder.iterdir() if not p.name.endswith(".reason")) if folder.exists() else []


def test_full_quarantine_refuses_counts_and_logs(tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = data_path(data_dir, "bad_inputs")
    ingestor = _ingestor(tmp_path / "store", quota=60_000)
    with caplog.at_level(logging.WARNING, logger="edge_client.ingest.quarantine"):
        summary = ingestor.ingest_paths([bad / SMALL, bad / MEDIUM, bad / LARGE], progress=False)
    assert (summary.quarantined, summary.quarantine_full) == (3, 1)  # all three bad, one not kept
    assert summary.reasons == {"invalid_uid": 1, "no_meta": 1, "truncated": 1}
    assert _kept(tmp_path / "store") == [SMALL, MEDIUM]
    assert ingestor.quarantine.used_bytes <= 60_000
    assert sum(p.stat().st_size for p in (tmp_path / "store" / "quarantine").iterdir()) == ingestor.quarantine.used_bytes
    assert any("quarantine full" in r.getMessage() and LARGE in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "store" / "quarantine").glob("*.tmp"))


def test_space_freed_by_a_person_is_used_again(tmp_path: Path, data_dir: Path) -> None:
    bad = data_path(data_dir, "bad_inputs")
    ingestor = _ingestor(tmp_path / "store", quota=200_000)
    ingestor.ingest_paths([bad / SMALL, bad / MEDIUM], progress=False)
    refused = ingestor.ingest_file(bad / LARGE, move_bad=False)  # 48.5 kB used + 184 kB > 200 kB
    assert refused.outcome is Outcome.QUARANTINED and not refused.kept
    assert ingestor.ingest_file(bad / MEDIUM, move_bad=False).kept  # the same bytes again take no room
    shutil.rmtree(tmp_path / "store" / "quarantine")  # someone looked and cleared it
    assert ingestor.ingest_file(bad / LARGE, move_bad=False).kept
    assert _kept(tmp_path / "store") == [LARGE] and ingestor.summary().quarantine_full == 1


def test_refused_file_stays_in_the_watched_inbox(tmp_path: Path, data_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copyfile(data_path(data_dir, "bad_inputs", LARGE), inbox / LARGE)
    ingestor = _ingestor(tmp_path / "store", quota=10_000)
    stop = threading.Event()
    worker = threading.Thread(target=watch, args=(ingestor, inbox, stop), kwargs={"poll_s": 0.05}, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and ingestor.summary().quarantined == 0:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=5)
    assert ingestor.summary().quarantine_full == 1
    assert (inbox / LARGE).exists() and _kept(tmp_path / "store") == []  # not moved: nothing lost


def test_cli_quarantine_quota(tmp_path: Path, data_dir: Path) -> None:
    app = typer.Typer()
    app.command()(ingest)
    report = tmp_path / "report.json"
    args = [str(data_path(data_dir, "bad_inputs")), "--store", str(tmp_path / "store"), "--report", str(report)]
    result = CliRunner().invoke(app, [*args, "--quarantine-mb", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert (data["quarantined"], data["quarantine_full"], data["schema_version"]) == (3, 3, 2)
    assert _kept(tmp_path / "store") == []
    bad = CliRunner().invoke(app, [*args, "--quarantine-mb", "-1"])
    assert bad.exit_code == 2
