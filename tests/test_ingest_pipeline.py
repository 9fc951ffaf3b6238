"""Folder ingest end to end on the real data: every file accounted for, bad ones quarantined, sources untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
import typer
from data_fixtures import data_path
from typer.testing import CliRunner

from edge_client.ingest.labels import Labels
from edge_client.ingest.pipeline import Ingestor, IngestSummary, discover
from edge_client.ingest.reader import ReadConfig
from edge_client.ingest.store import SPLITS, DatasetStore
from edge_client.ingest.watch import watch
from fedge.cli.ingest import ingest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file's size, mtime and content hash: what "never modifies the source" means."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _ingestor(root: Path, labels: Labels | None = None, size: int = 28) -> Ingestor:
    return Ingestor(DatasetStore.open_or_create(root, size, 1), ReadConfig(image_size=size), labels)


def test_every_file_under_dicom_is_ingested_and_the_source_is_untouched(tmp_path: Path, data_dir: Path) -> None:
    source = data_path(data_dir, "dicom")
    before = _snapshot(source)
    files = discover(source)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    summary = _ingestor(tmp_path / "store").ingest_paths(files, progress=False)
    assert summary.quarantined == 0, summary.reasons
    # Files that repeat a SOPInstanceUID (one MR image in five syntaxes) count as duplicates.
    assert summary.ingested == len(uids) and summary.ingested + summary.duplicates == len(files)
    store = DatasetStore.open(tmp_path / "store")
    assert len(store) == summary.images == len(uids) + 9  # the 10-frame MR adds 9 more images
    assert _snapshot(source) == before


def test_every_bad_input_is_quarantined_with_a_reason_and_copied_not_moved(tmp_path: Path, data_dir: Path) -> None:
    source = data_path(data_dir, "bad_inputs")
    before = _snapshot(source)
    summary = _ingestor(tmp_path / "store").ingest_paths(discover(source), progress=False)
    assert summary.ingested == 0 and summary.quarantined == len(before) == 3
    assert summary.reasons == {"invalid_uid": 1, "no_meta": 1, "truncated": 1}
    quarantine = tmp_path / "store" / "quarantine"
    kept = sorted(p for p in quarantine.iterdir() if not p.name.endswith(".reason"))
    assert len(kept) == 3
    for path in kept:
        reason = path.with_name(path.name + ".reason").read_text()
        assert reason.count("\n") == 1 and reason.split(":")[0] in summary.reasons
        original = source / path.name.split("-", 1)[1]
        assert path.read_bytes() == original.read_bytes()
    assert _snapshot(source) == before
    # A re-run quarantines the same bytes again, but keeps a single copy of each.
    _ingestor(tmp_path / "store").ingest_paths(discover(source), progress=False)
    assert len(list(quarantine.iterdir())) == 6


def test_one_bad_file_does_not_stop_the_run(tmp_path: Path, data_dir: Path) -> None:
    files = [data_path(data_dir, "bad_inputs", "MR_truncated.dcm")] + discover(data_path(data_dir, "dicom", "ct_series_liver_3slice"))
    summary = _ingestor(tmp_path / "store").ingest_paths(files, progress=False)
    assert (summary.ingested, summary.quarantined) == (3, 1)


def test_labels_from_csv_by_instance_and_by_study(tmp_path: Path, data_dir: Path) -> None:
    ct = discover(data_path(data_dir, "dicom", "ct_series_liver_3slice"))
    mr = discover(data_path(data_dir, "dicom", "mr_series_prostate_adc_20slice"))[:4]
    ct_study = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    mr_first = str(pydicom.dcmread(mr[0], stop_before_pixels=True).SOPInstanceUID)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"SOPInstanceUID,StudyInstanceUID,label\n{mr_first},,2\n,{ct_study},1\n")
    ingestor = _ingestor(tmp_path / "store", Labels.from_csv(csv_path))
    ingestor.ingest_paths(ct + mr, progress=False)
    labels = sorted(r.label for r in ingestor.store.rows)
    assert labels == [-1, -1, -1, 1, 1, 1, 2]  # 3 CT by study, 1 MR by instance, 3 MR unlabelled


def test_labels_csv_mistakes_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("SOPInstanceUID,label\n1.2.3,benign\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: label 'benign'"):
        Labels.from_csv(bad)
    bad.write_text("uid,label\n1.2.3,1\n")
    with pytest.raises(ValueError, match="SOPInstanceUID or StudyInstanceUID column"):
        Labels.from_csv(bad)


def test_labels_from_class_folders(tmp_path: Path, data_dir: Path) -> None:
    ct = discover(data_path(data_dir, "dicom", "ct_series_liver_3slice"))
    inbox = tmp_path / "inbox"
    for k, path in enumerate(ct):
        target = inbox / ("0_normal" if k == 0 else "1_lesion") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    (inbox / "loose.dcm").symlink_to(ct[0])  # outside any class folder and a duplicate anyway
    ingestor = _ingestor(tmp_path / "store", Labels.from_folders(inbox))
    ingestor.ingest_paths(discover(inbox), progress=False)
    assert sorted(r.label for r in ingestor.store.rows) == [0, 1, 1]
    (inbox / "misc").mkdir()
    with pytest.raises(ValueError, match="'0_normal'"):
        Labels.from_folders(inbox)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(ingest)
    return app


def test_cli_one_shot_writes_the_report(tmp_path: Path, data_dir: Path) -> None:
    store, report = tmp_path / "store", tmp_path / "report.json"
    folder = data_path(data_dir, "dicom", "ct_series_liver_3slice")
    result = CliRunner().invoke(_cli(), [str(folder), "--store", str(store), "--size", "64", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert {"ingested", "quarantined", "reasons", "seconds"} <= set(data)
    assert (data["ingested"], data["quarantined"], data["reasons"]) == (3, 0, {})
    assert IngestSummary.from_json(report.read_text()).images == 3
    arrays = DatasetStore.open(store).as_arrays(labelled_only=False)
    assert sum(len(arrays[f"{s}_images"]) for s in SPLITS) == 3 and arrays["train_images"].shape[1:] == (64, 64)
    # The store was made for 64 px: asking for 28 is a usage error that names the fix.
    again = CliRunner().invoke(_cli(), [str(folder), "--store", str(store), "--size", "28"])
    assert again.exit_code == 2 and "new --store" in again.output
    neither = CliRunner().invoke(_cli(), ["--store", str(store)])
    assert neither.exit_code == 2 and "--scp" in neither.output


def test_watch_ingests_arrivals_and_moves_bad_files_out(tmp_path: Path, data_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ingestor = _ingestor(tmp_path / "store")
    stop = threading.Event()
    worker = threading.Thread(target=watch, args=(ingestor, inbox, stop), kwargs={"poll_s": 0.05}, daemon=True)
    worker.start()
    try:
        for path in discover(data_path(data_dir, "dicom", "ct_series_liver_3slice")):
            shutil.copyfile(path, inbox / path.name)
        shutil.copyfile(data_path(data_dir, "bad_inputs", "no_meta.dcm"), inbox / "no_meta.dcm")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(ingestor.store) < 3 or (inbox / "no_meta.dcm").exists()):
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=5)
    assert len(ingestor.store) == 3
    assert not (inbox / "no_meta.dcm").exists()  # moved, not copied
    assert len(list((tmp_path / "store" / "quarantine").glob("*-no_meta.dcm"))) == 1
    assert sorted(p.name for p in inbox.iterdir()) == ["01.dcm", "02.dcm", "03.dcm"]  # good files stay put
    summary = ingestor.summary()
    assert (summary.ingested, summary.quarantined, summary.duplicates) == (3, 1, 0)  # each file read once
