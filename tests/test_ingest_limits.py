"""Size caps before work: hostile dimensions and oversized files are refused from the header or the
file length, with a reason, before any pixel is decoded or the file is read whole.

The files are real DICOM written with pydicom: tiny, valid pixel data under dimensions chosen to
hurt (1 x 65535 was padded to a 16 GiB float32 square before these caps), or a header whose pixel
data is a sparse hole on disk, so the test costs no disk and no memory unless the code reads it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from data_fixtures import data_path
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from edge_client.ingest import reader
from edge_client.ingest.errors import QuarantineError, Reason
from edge_client.ingest.limits import Limits
from edge_client.ingest.pipeline import Ingestor
from edge_client.ingest.reader import ReadConfig, load_dataset, read_dataset
from edge_client.ingest.store import DatasetStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def dicom_image(path: Path, rows: int, cols: int, frames: int = 1, claim: dict[str, int] | None = None) -> Path:
    """A secondary-capture file with real 8-bit pixels of rows x cols x frames; `claim` then
    overwrites header values (Rows, Columns, NumberOfFrames) without changing the pixel data."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    ds.set_pixel_data((np.arange(rows * cols * frames) % 251).astype(np.uint8).reshape(shape), "MONOCHROME2", 8)
    for keyword, value in (claim or {}).items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _refusal(path: Path, config: ReadConfig | None = None) -> QuarantineError:
    config = config or ReadConfig()
    with pytest.raises(QuarantineError) as info:
        read_dataset(load_dataset(path, config.limits), config)
    return info.value


def test_one_by_65535_is_refused_from_the_header(tmp_path: Path) -> None:
    """64 KB of real pixels that the padding made into a 16 GiB float32 square (MemoryError or
    4.6 s of CPU, depending on the machine): refused before decode."""
    path = dicom_image(tmp_path / "wide.dcm", 1, 65535)
    assert path.stat().st_size < 70_000
    err = _refusal(path)
    assert err.reason is Reason.TOO_LARGE and "1 x 65535" in err.detail and "16384 a side" in err.detail


def test_extreme_aspect_ratio_under_the_side_cap_is_refused_for_its_padding(tmp_path: Path) -> None:
    path = dicom_image(tmp_path / "strip.dcm", 2, 12000)  # 24 KB of pixels, a 549 MiB square per frame
    err = _refusal(path)
    assert err.reason is Reason.TOO_LARGE and "aspect ratio 6000:1" in err.detail
    # a site that wants such strips raises the cap, and then the same file decodes
    roomy = ReadConfig(limits=Limits(max_padded_bytes=1 << 30))
    assert read_dataset(load_dataset(path), roomy).images.shape == (1, 28, 28)


def test_frame_and_pixel_count_claims_are_refused_before_decode(tmp_path: Path) -> None:
    frames = dicom_image(tmp_path / "frames.dcm", 2, 2, frames=5000)
    assert "5000 frames" in _refusal(frames).detail
    # The header claims 1000 frames of 512 x 512 over 16 bytes of pixels: refused for what the
    # decode would allocate (262 M samples) before the decoder could notice the data is short.
    bomb = dicom_image(tmp_path / "bomb.dcm", 4, 4, claim={"Rows": 512, "Columns": 512, "NumberOfFrames": 1000})
    err = _refusal(bomb)
    assert err.reason is Reason.TOO_LARGE and "262144000 samples" in err.detail


def test_nonsense_dimensions_are_bad_header(tmp_path: Path) -> None:
    path = dicom_image(tmp_path / "zero.dcm", 2, 2, claim={"Columns": 0})
    assert _refusal(path).reason is Reason.BAD_HEADER


def test_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path: Path, data_dir: Path) -> None:
    ct = data_path(data_dir, "ct", "ge_head_human_28slice", "01.dcm")  # 526 KB
    small = ReadConfig(limits=Limits(max_file_bytes=100_000))
    err = _refusal(ct, small)
    assert err.reason is Reason.TOO_LARGE and "526228 bytes" in err.detail
    assert read_dataset(load_dataset(ct), ReadConfig()).images.shape == (1, 28, 28)  # the default cap takes it


@pytest.mark.integration
def test_a_2_gib_file_costs_no_memory_to_refuse(tmp_path: Path) -> None:
    """A real header whose 2.7 GB of pixel data is a sparse hole: before the cap, dcmread pulled all
    of it into memory. Measured in a child process so its peak RSS is its own."""
    header = dicom_image(tmp_path / "big.dcm", 2, 2, claim={"Rows": 16384, "Columns": 16384, "NumberOfFrames": 10})
    ds = pydicom.dcmread(header)
    ds.PixelData = b""
    ds.save_as(header, enforce_file_format=True)
    declared = 16384 * 16384 * 10
    with open(header, "r+b") as fh:  # rewrite the empty Pixel Data as one of `declared` bytes, then a hole
        raw = fh.read()
        at = raw.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010)
        fh.seek(at + 8)  # tag (4) + VR OB (2) + reserved (2), then a 4-byte length
        fh.write(declared.to_bytes(4, "little"))
        fh.truncate(at + 12 + declared)
    assert header.stat().st_size > 2 << 30 and header.stat().st_blocks * 512 < 1 << 20
    code = (  # the peak after the imports is the baseline: what the refusal adds is measured against it
        "import resource, sys\n"
        "from edge_client.ingest.reader import load_dataset\n"
        "from edge_client.ingest.errors import QuarantineError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_dataset(sys.argv[1]); print('read')\n"
        "except QuarantineError as e:\n    print(e.reason.value)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(header)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    outcome, added_mib = run.stdout.split()
    assert outcome == "too_large" and int(added_mib) < 64, run.stdout


def test_pipeline_quarantines_hostile_files_with_their_reasons_and_goes_on(tmp_path: Path, data_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    dicom_image(inbox / "wide.dcm", 1, 65535)
    dicom_image(inbox / "strip.dcm", 2, 12000)
    good = data_path(data_dir, "ct", "ge_head_human_28slice", "01.dcm")
    (inbox / "good.dcm").write_bytes(good.read_bytes())
    ingestor = Ingestor(DatasetStore.create(tmp_path / "store", 28), ReadConfig())
    summary = ingestor.ingest_paths(sorted(inbox.iterdir()), progress=False)
    assert (summary.ingested, summary.quarantined, summary.reasons) == (1, 2, {"too_large": 2})
    reasons = sorted(p.read_text() for p in (tmp_path / "store" / "quarantine").glob("*.reason"))
    assert len(reasons) == 2 and all(r.startswith("too_large: ") and r.count("\n") == 1 for r in reasons)
    assert any("aspect ratio" in r for r in reasons) and any("a side" in r for r in reasons)


def test_multiframe_resized_in_batches_matches_one_batch(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = data_path(data_dir, "dicom", "modalities", "MR_emri_small_RLE_multiframe.dcm")
    whole = read_dataset(load_dataset(path), ReadConfig(image_size=32)).images
    monkeypatch.setattr(reader, "_RESIZE_BATCH_BYTES", 1)  # one frame per batch
    assert np.array_equal(read_dataset(load_dataset(path), ReadConfig(image_size=32)).images, whole)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_side"):
        Limits(max_side=0)
