"""The local dataset store: MedMNIST layout, dedupe, de-identified index, crash safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from data_fixtures import data_path
from test_files import FsyncLog, linux_only

from edge_client.ingest.reader import Instance, ReadConfig, load_dataset, read_dataset
from edge_client.ingest.store import SPLITS, DatasetStore, is_store, split_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _instances(folder: Path, size: int = 28) -> list[Instance]:
    return [read_dataset(load_dataset(p), ReadConfig(image_size=size)) for p in sorted(folder.glob("*.dcm"))]


@pytest.fixture(scope="module")
def mr_series(data_dir: Path) -> list[Instance]:
    return _instances(data_path(data_dir, "dicom", "mr_series_prostate_adc_20slice"))


def test_create_open_add_and_medmnist_layout(tmp_path: Path, mr_series: list[Instance]) -> None:
    store = DatasetStore.create(tmp_path / "s", image_size=28, channels=1)
    assert is_store(tmp_path / "s") and not is_store(tmp_path)
    for i, inst in enumerate(mr_series):
        assert store.add(inst, label=i % 2) == 1
    reopened = DatasetStore.open(tmp_path / "s")
    assert len(reopened) == 20
    arrays = reopened.as_arrays()
    assert set(arrays) == {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")}
    assert sum(len(arrays[f"{s}_images"]) for s in SPLITS) == 20
    for s in SPLITS:
        images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert labels.shape == (len(images), 1) and set(labels[:, 0]) <= {0, 1}
    # the bytes on disk are the images that went in, in order
    assert np.array_equal(reopened.images()[3], mr_series[3].images[0])


def test_unlabelled_images_are_kept_but_left_out_of_labelled_arrays(tmp_path: Path, mr_series: list[Instance]) -> None:
    store = DatasetStore.create(tmp_path / "s", 28)
    store.add(mr_series[0], label=1)
    store.add(mr_series[1])  # unlabelled
    labelled = store.as_arrays()
    everything = store.as_arrays(labelled_only=False)
    assert sum(len(labelled[f"{s}_labels"]) for s in SPLITS) == 1
    all_labels = np.concatenate([everything[f"{s}_labels"][:, 0] for s in SPLITS])
    assert sorted(all_labels.tolist()) == [-1, 1]


def test_same_instance_is_stored_once(tmp_path: Path, mr_series: list[Instance]) -> None:
    store = DatasetStore.create(tmp_path / "s", 28)
    assert store.add(mr_series[0]) == 1
    assert store.add(mr_series[0]) == 0
    assert DatasetStore.open(tmp_path / "s").add(mr_series[0]) == 0  # across reopen, too
    assert len(store) == 1 and store.contains(mr_series[0].sop_instance_uid)


def test_multiframe_stores_every_frame_in_one_split(tmp_path: Path, data_dir: Path) -> None:
    path = data_path(data_dir, "dicom", "modalities", "MR_emri_small_RLE_multiframe.dcm")
    store = DatasetStore.create(tmp_path / "s", 28)
    assert store.add(read_dataset(load_dataset(path), ReadConfig())) == 10
    assert [r.frame for r in store.rows] == list(range(10))
    assert len({r.split for r in store.rows}) == 1  # no frame of one instance leaks into another split


def test_index_holds_no_dicom_value_and_hashes_are_salted_per_store(tmp_path: Path, data_dir: Path) -> None:
    folder = data_path(data_dir, "dicom", "ct_series_liver_3slice")
    a, b = DatasetStore.create(tmp_path / "a", 28), DatasetStore.create(tmp_path / "b", 28)
    for inst in _instances(folder):
        a.add(inst)
        b.add(inst)
    on_disk = (tmp_path / "a" / "index.csv").read_text() + (tmp_path / "a" / "store.json").read_text()
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientName", "PatientID", "StudyDate", "InstitutionName"):
            value = str(ds.get(keyword, "") or "")
            if value:
                assert value not in on_disk, keyword
    assert (tmp_path / "a" / "salt").stat().st_mode & 0o077 == 0  # readable by the agent's user only
    assert {r.uid_hash for r in a.rows}.isdisjoint({r.uid_hash for r in b.rows})
    assert len({r.uid_hash for r in a.rows}) == 3


def test_crash_leftovers_are_cut_on_the_next_append(tmp_path: Path, mr_series: list[Instance]) -> None:
    store = DatasetStore.create(tmp_path / "s", 28)
    store.add(mr_series[0], label=0)
    with open(tmp_path / "s" / "images.u8", "ab") as fh:  # image bytes written, index line never was
        fh.write(bytes(28 * 28 * 2))
    with open(tmp_path / "s" / "index.csv", "a") as fh:  # a line torn in half
        fh.write("deadbeef,0,")
    reopened = DatasetStore.open(tmp_path / "s")
    assert len(reopened) == 1
    reopened.add(mr_series[1], label=1)
    again = DatasetStore.open(tmp_path / "s")
    assert len(again) == 2 and (tmp_path / "s" / "images.u8").stat().st_size == 2 * 28 * 28
    assert np.array_equal(again.images()[1], mr_series[1].images[0])
    assert [r.label for r in again.rows] == [0, 1]


def test_caller_mistakes_raise_with_the_fix(tmp_path: Path, mr_series: list[Instance]) -> None:
    store = DatasetStore.create(tmp_path / "s", 28)
    with pytest.raises(ValueError, match="image_size=64"):
        DatasetStore.create(tmp_path / "t", 64).add(mr_series[0])
    with pytest.raises(ValueError, match="label"):
        store.add(mr_series[0], label=-5)
    with pytest.raises(FileExistsError, match="DatasetStore.open"):
        DatasetStore.create(tmp_path / "s", 28)
    with pytest.raises(ValueError, match="image size 28, not 64"):
        DatasetStore.open_or_create(tmp_path / "s", 64, None)
    with pytest.raises(FileNotFoundError, match="fedge ingest"):
        DatasetStore.open(tmp_path / "nowhere")
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta == {"schema_version": 1, "kind": "fedge-dicom-store", "image_size": 28, "channels": 1}


def test_rgb_store_layout(tmp_path: Path) -> None:
    store = DatasetStore.create(tmp_path / "s", 16, channels=3)
    img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(1, 16, 16, 3)
    store.add(Instance("1.2.3.4", "1.2.3", img, 16, 16), label=2)
    arrays = store.as_arrays()
    split = next(s for s in SPLITS if len(arrays[f"{s}_images"]))
    assert arrays[f"{split}_images"].shape == (1, 16, 16, 3)
    assert np.array_equal(arrays[f"{split}_images"][0], img[0])


def test_split_is_deterministic_and_roughly_80_10_10() -> None:
    import hashlib

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    splits = [split_for(h) for h in hashes]
    assert splits == [split_for(h) for h in hashes]
    share = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert 0.77 < share["train"] < 0.83 and 0.07 < share["val"] < 0.13 and 0.07 < share["test"] < 0.13


@linux_only
def test_create_syncs_salt_index_and_meta_and_their_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without these fsyncs a power cut after `create` can leave a store.json whose salt is empty or
    missing: every hash made since would be unreproducible and the store unusable."""
    log = FsyncLog(monkeypatch)
    root = tmp_path / "s"
    DatasetStore.create(root, 28)
    for name in ("salt", "index.csv", "store.json"):
        assert log.synced_after_replace(root, root / name), (name, log.events)
    assert log.synced(tmp_path)  # the store folder's own entry in its parent
    assert sorted(p.name for p in root.iterdir()) == ["images.u8", "index.csv", "salt", "store.json"]  # no temp files
    assert (root / "salt").stat().st_mode & 0o077 == 0 and len(bytes.fromhex((root / "salt").read_text())) == 32
