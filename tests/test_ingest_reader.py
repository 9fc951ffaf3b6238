"""The DICOM reader on real files: transfer syntaxes, LUTs, windows, colour, frames, and every failure code."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from data_fixtures import data_path
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import convert_color_space
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian

from edge_client.ingest.errors import QuarantineError, Reason
from edge_client.ingest.reader import ReadConfig, load_dataset, read_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _read(path: Path, **config: object) -> np.ndarray:
    return read_dataset(load_dataset(path), ReadConfig(**config)).images  # type: ignore[arg-type]


def _reason(ds: pydicom.Dataset, **config: object) -> Reason:
    with pytest.raises(QuarantineError) as info:
        read_dataset(ds, ReadConfig(**config))  # type: ignore[arg-type]
    assert "\n" not in info.value.detail
    return info.value.reason


@pytest.mark.parametrize("size", [384, 28])
def test_nine_transfer_syntaxes_give_identical_images(data_dir: Path, size: int) -> None:
    folder = data_path(data_dir, "dicom", "transfer_syntax_mr_9ts")
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 9
    syntaxes = {str(load_dataset(f).file_meta.TransferSyntaxUID) for f in files}
    assert len(syntaxes) == 7  # LE explicit/implicit, BE, RLE, JPEG-LL, JPEG-LS, J2K
    images = [_read(f, image_size=size) for f in files]
    assert images[0].shape == (1, size, size) and images[0].dtype == np.uint8
    assert images[0].std() > 10  # a real picture, not a constant
    for f, img in zip(files[1:], images[1:]):
        assert np.array_equal(images[0], img), f.name


def test_every_modality_file_decodes_to_medmnist_layout(data_dir: Path) -> None:
    for path in sorted(data_path(data_dir, "dicom", "modalities").glob("*.dcm")):
        img = _read(path, image_size=28)
        assert img.dtype == np.uint8 and img.shape[1:] == (28, 28), path.name
        assert img.max() > img.min(), f"{path.name} came out flat"


def test_multiframe_gives_one_image_per_frame(data_dir: Path) -> None:
    img = _read(data_path(data_dir, "dicom", "modalities", "MR_emri_small_RLE_multiframe.dcm"), image_size=32)
    assert img.shape == (10, 32, 32)
    assert not np.array_equal(img[0], img[5])


def test_modality_lut_and_default_ct_window_match_hand_computation(data_dir: Path) -> None:
    path = data_path(data_dir, "dicom", "modalities", "CT_small.dcm")  # no window tags, intercept -1024
    ds = load_dataset(path)
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.round(np.clip((hu - 39.5) / 399.0 + 0.5, 0, 1) * 255).astype(np.uint8)
    got = _read(path, image_size=128)[0]  # native size: no resampling
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_ct_window_presets_override_tags_and_change_the_image(data_dir: Path) -> None:
    path = data_path(data_dir, "ct", "ge_head_human_28slice", "10.dcm")  # tags: 35/100 (brain-like)
    auto, soft, lung = (_read(path, window=w) for w in ("auto", "soft_tissue", "lung"))
    assert not np.array_equal(auto, soft) and not np.array_equal(soft, lung)


def test_monochrome1_is_inverted(data_dir: Path) -> None:
    path = data_path(data_dir, "dicom", "modalities", "DX_highdicom_dx_image.dcm")
    ds = load_dataset(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    side = max(ds.Rows, ds.Columns)  # native size: no resampling blurs the edges
    top = (side - ds.Rows) // 2
    as_mono1 = read_dataset(ds, ReadConfig(image_size=side)).images.astype(int)
    ds.PhotometricInterpretation = "MONOCHROME2"
    as_mono2 = read_dataset(ds, ReadConfig(image_size=side)).images.astype(int)
    area = np.s_[:, top : top + ds.Rows, :]  # the padding that squares the image stays black in both
    assert np.abs(as_mono1[area] + as_mono2[area] - 255).max() <= 1
    assert as_mono1[:, :top].max() == 0


def test_non_square_images_are_padded_not_stretched(data_dir: Path) -> None:
    img = _read(data_path(data_dir, "dicom", "modalities", "NM_JPEG-LL.dcm"), image_size=28)[0]  # 1024 x 256
    assert img[:, :8].max() == 0 and img[:, -8:].max() == 0  # side bands are padding
    assert img[:, 12:16].max() > 0


def _rgb_file(tmp_path: Path, base: Path, photometric: str) -> tuple[Path, np.ndarray]:
    """A real Part 10 file: a real DICOM header carrying an 8-bit colour picture."""
    ds = pydicom.dcmread(base)
    rng = np.random.default_rng(0)
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[:16, :, 0], rgb[16:, :, 1], rgb[:, :16, 2] = 200, 120, 60
    rgb = np.clip(rgb.astype(int) + rng.integers(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    stored = convert_color_space(rgb, "RGB", "YBR_FULL") if photometric == "YBR_FULL" else rgb
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 32, 32, 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    ds.Modality = "OT"
    ds.PixelData = stored.tobytes()
    for tag in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        ds.pop(tag, None)
    path = tmp_path / f"{photometric}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, rgb


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_kept_as_rgb_or_turned_to_luminance(data_dir: Path, tmp_path: Path, photometric: str) -> None:
    path, rgb = _rgb_file(tmp_path, data_path(data_dir, "dicom", "modalities", "CT_small.dcm"), photometric)
    colour = _read(path, image_size=32, channels=3)[0]
    assert colour.shape == (32, 32, 3)
    assert np.abs(colour.astype(int) - rgb).max() <= 2  # YBR round trip costs a little
    grey = _read(path, image_size=32, channels=1)[0]
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert grey.shape == (32, 32) and np.abs(grey - luma).max() <= 2.5


def test_grayscale_as_three_channels_repeats_the_plane(data_dir: Path) -> None:
    img = _read(data_path(data_dir, "dicom", "modalities", "MR_small.dcm"), image_size=28, channels=3)
    assert img.shape == (1, 28, 28, 3)
    assert np.array_equal(img[..., 0], img[..., 2])


# --- failure codes ------------------------------------------------------------------------------


def test_bad_input_files_get_their_codes(data_dir: Path) -> None:
    bad = data_path(data_dir, "bad_inputs")
    expected = {
        "MR_truncated.dcm": Reason.TRUNCATED,
        "no_meta.dcm": Reason.NO_META,
        "bad_sequence_ct_jpegll.dcm": Reason.INVALID_UID,  # SOPInstanceUID is a hex digest, not a UID
    }
    for name, reason in expected.items():
        with pytest.raises(QuarantineError) as info:
            read_dataset(load_dataset(bad / name), ReadConfig())
        assert info.value.reason is reason, name


def test_file_cut_inside_compressed_pixel_data_is_truncated(data_dir: Path) -> None:
    raw = data_path(data_dir, "dicom", "transfer_syntax_mr_9ts", "9.dcm").read_bytes()
    ds = load_dataset(io.BytesIO(raw[: len(raw) // 2]))
    assert _reason(ds) is Reason.TRUNCATED


def test_corrupt_codestream_is_undecodable(data_dir: Path) -> None:
    ds = load_dataset(data_path(data_dir, "dicom", "modalities", "MR_small_jpeg_ls_lossless.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:2] + bytes(len(frame) - 2)])  # SOI marker, then zeros
    assert _reason(ds) is Reason.UNDECODABLE_PIXELS


def test_syntax_without_decoder_is_unsupported(data_dir: Path) -> None:
    ds = load_dataset(data_path(data_dir, "dicom", "modalities", "MR_small_jpeg_ls_lossless.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    assert _reason(ds) is Reason.UNSUPPORTED_SYNTAX


def test_modality_outside_the_task_is_wrong_modality(data_dir: Path) -> None:
    ds = load_dataset(data_path(data_dir, "dicom", "modalities", "MR_small.dcm"))
    assert _reason(ds, modalities=frozenset({"CT"})) is Reason.WRONG_MODALITY


def test_dataset_without_image_is_no_pixels_or_truncated(data_dir: Path) -> None:
    ds = load_dataset(data_path(data_dir, "dicom", "modalities", "MR_small.dcm"))
    del ds.PixelData
    assert _reason(ds) is Reason.TRUNCATED  # an MR image header with nothing after it
    for tag in ("Rows", "Columns"):
        delattr(ds, tag)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    assert _reason(ds) is Reason.NO_PIXELS


def test_read_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="window"):
        ReadConfig(window="liver")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels"):
        ReadConfig(channels=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size"):
        ReadConfig(image_size=4)
