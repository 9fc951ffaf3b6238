"""Decode one DICOM instance into task-ready uint8 images (MedMNIST layout), or say why it cannot be.

Pipeline per instance: stored values -> modality LUT (rescale) -> VOI window (tags, a preset, or a
per-modality default) -> MONOCHROME1 inversion -> pad to square -> antialiased resize -> uint8.
Colour (RGB/YBR) is converted to RGB by pydicom and then kept or turned into luminance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from edge_client.ingest.errors import QuarantineError, Reason
from edge_client.ingest.limits import FLOAT32_BYTES, Limits, check_image, check_length

# CT windows in HU, (centre, width): the usual radiology presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
WindowChoice = Literal["auto", "soft_tissue", "lung", "brain", "bone"]
# Modalities that carry a picture a model can learn from; SEG, RTDOSE, SR and the like do not.
IMAGE_MODALITIES = frozenset({"CT", "MR", "CR", "DX", "MG", "NM", "PT", "US", "XA", "RF", "OT", "OP", "IO", "PX", "ES", "XC", "GM"})
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as MedMNIST's PIL "L"
_RESIZE_BATCH_BYTES = 256 << 20  # padded float32 frames resized at once
_PERCENTILES = (0.5, 99.5)  # fallback window where the image carries none and the modality has no scale


@dataclass(frozen=True)
class ReadConfig:
    """What the task wants out of every image.

    window: "auto" takes the VOI window from the tags, else the modality's default (CT soft tissue,
    others a robust min-max); a preset name forces that window on every CT image (HU are absolute,
    so a preset means the same on every scanner) and leaves other modalities on "auto".
    limits: size caps checked before a file is read or its pixels decoded.
    """

    image_size: int = 28
    channels: Literal[1, 3] = 1
    modalities: frozenset[str] = field(default=IMAGE_MODALITIES)
    window: WindowChoice = "auto"
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size={self.image_size}: use a task input size between 8 and 1024 (MedMNIST: 28, 64, 128, 224)")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels}: use 1 (grayscale) or 3 (RGB)")
        if self.window != "auto" and self.window not in WINDOW_PRESETS:
            raise ValueError(f"window={self.window!r}: use 'auto' or one of {sorted(WINDOW_PRESETS)}")
        if not self.modalities:
            raise ValueError("modalities is empty: name at least one, e.g. frozenset({'CT'})")


@dataclass(frozen=True)
class Instance:
    """One decoded SOP instance. The UIDs stay in memory on the device; the store keeps only salted hashes."""

    sop_instance_uid: str
    study_instance_uid: str
    images: np.ndarray  # (frames, S, S) or (frames, S, S, 3) uint8
    rows: int
    cols: int


def load_dataset(source: str | os.PathLike[str] | BinaryIO, limits: Limits = Limits()) -> Dataset:
    """dcmread (a path, or a stream such as bytes the SCP received) with failures mapped to reasons.

    A source longer than limits.max_file_bytes is refused before anything is read. Pixel data is
    read but not decoded yet. OSError other than EOF is the caller's (path, rights, disk) and
    propagates: it says nothing about the file.
    """
    check_length(source, limits)
    try:
        return pydicom.dcmread(source)
    except InvalidDicomError as exc:
        # No preamble/"DICM"/file meta: pydicom cannot know the transfer syntax, so neither can we.
        raise QuarantineError(Reason.NO_META, "no DICOM preamble or file meta (not a DICOM Part 10 file)") from exc
    except EOFError as exc:
        raise QuarantineError(Reason.TRUNCATED, f"file ends inside the header: {exc}") from exc
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage headers; all mean one bad file
        raise QuarantineError(Reason.BAD_HEADER, f"{type(exc).__name__}: {exc}") from exc


def read_dataset(ds: Dataset, config: ReadConfig) -> Instance:
    """Validate and decode a dataset read from a file or received over the network."""
    sop_class = UID(str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", Dataset()), "MediaStorageSOPClassUID", "")))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # Rows present or an image SOP class, yet no pixels: the file stopped early.
        if "Rows" in ds or sop_class.name.endswith("Image Storage"):
            raise QuarantineError(Reason.TRUNCATED, f"{sop_class.name or 'dataset'} without its pixel data")
        raise QuarantineError(Reason.NO_PIXELS, f"{sop_class.name or 'dataset'} holds no image")
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    if not sop_uid or not UID(sop_uid).is_valid:
        raise QuarantineError(Reason.INVALID_UID, "SOPInstanceUID missing or not a valid DICOM UID (digits and dots, at most 64)")
    modality = str(ds.get("Modality", "")).upper()
    if modality not in config.modalities:
        raise QuarantineError(Reason.WRONG_MODALITY, f"modality {modality or 'missing'} not in {sorted(config.modalities)}")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in _GREY | _COLOUR:
        raise QuarantineError(Reason.UNSUPPORTED_PHOTOMETRIC, f"photometric interpretation {photometric or 'missing'}")
    check_image(ds, config.channels, config.limits)  # before any decode: the header decides what it costs
    _check_decoder(ds)
    raw = _decode(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = photometric in _COLOUR
    if frames == 1:
        raw = raw[None]
    if colour:
        unit = raw.astype(np.float32) / float(2 ** int(ds.get("BitsStored", 8)) - 1)
    else:
        unit = _window(apply_modality_lut(raw, ds).astype(np.float32), ds, modality, config.window)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
    images = _to_channels(unit, colour, config.channels)
    return Instance(
        sop_instance_uid=sop_uid,
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        images=_resize_uint8(images, config.image_size),
        rows=int(raw.shape[1]),
        cols=int(raw.shape[2]),
    )


def _check_decoder(ds: Dataset) -> None:
    meta = ds.get("file_meta", Dataset())
    syntax = UID(str(meta.get("TransferSyntaxUID", "")))
    if not syntax:
        raise QuarantineError(Reason.NO_META, "no TransferSyntaxUID in the file meta")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise QuarantineError(Reason.UNSUPPORTED_SYNTAX, f"no decoder exists for {syntax.name or syntax}") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise QuarantineError(Reason.UNSUPPORTED_SYNTAX, f"no installed plugin decodes {syntax.name}: {missing}")


def _decode(ds: Dataset) -> np.ndarray:
    try:
        return pixel_array(ds)  # YBR is converted to RGB here (pydicom's default as_rgb=True)
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise QuarantineError(Reason.TRUNCATED, str(exc).split(" - ")[0]) from exc
        raise QuarantineError(Reason.UNDECODABLE_PIXELS, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # decoder plugins raise RuntimeError, struct.error, ... on corrupt streams
        raise QuarantineError(Reason.UNDECODABLE_PIXELS, f"{type(exc).__name__}: {exc}") from exc


def _first(value: object) -> float:
    """WindowCenter/Width may hold several windows; the first is the scanner's primary one."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _window(values: np.ndarray, ds: Dataset, modality: str, choice: WindowChoice) -> np.ndarray:
    """Map modality values (frames, H, W) to [0, 1] with the DICOM linear VOI function."""
    centre_width: tuple[float, float] | None = None
    if modality == "CT" and choice != "auto":
        centre_width = WINDOW_PRESETS[choice]
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre_width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    elif modality == "CT":
        centre_width = WINDOW_PRESETS["soft_tissue"]
    if centre_width is not None and centre_width[1] >= 1.0:
        c, w = centre_width
        return np.clip((values - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0)
    # No usable window: a robust min-max per frame (MR, NM and US have no absolute scale).
    lo, hi = np.percentile(values, _PERCENTILES, axis=(1, 2), keepdims=True)
    return np.clip((values - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)


def _to_channels(unit: np.ndarray, colour: bool, channels: int) -> np.ndarray:
    """(frames, H, W[, 3]) in [0, 1] -> (frames, H, W, channels)."""
    if colour and channels == 1:
        return (unit @ _LUMA)[..., None]
    if not colour:
        unit = unit[..., None]
        return np.repeat(unit, 3, axis=-1) if channels == 3 else unit
    return unit


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Pad to square (black borders keep the anatomy's aspect ratio), antialiased resize, uint8.

    Frames go through in batches of at most _RESIZE_BATCH_BYTES of padded float32 (at least one
    frame), so a long multi-frame series never holds all its padded squares at once.
    Returns (frames, S, S) for one channel, (frames, S, S, 3) for RGB, like MedMNIST.
    """
    frames, h, w, c = images.shape
    per_frame = max(h, w) ** 2 * c * FLOAT32_BYTES
    step = max(1, _RESIZE_BATCH_BYTES // per_frame)
    out = np.concatenate([_resize_batch(images[i : i + step], size) for i in range(0, frames, step)])
    return out[..., 0] if c == 1 else out


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    n, h, w, c = images.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((n, side, side, c), dtype=np.float32)
    square[:, top : top + h, left : left + w] = images
    tensor = torch.from_numpy(square).permute(0, 3, 1, 2)
    if side != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)
    out = tensor.permute(0, 2, 3, 1).numpy()  # small now: finish in numpy, off torch's thread pool
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
