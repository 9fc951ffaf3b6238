"""CT series in Hounsfield units, for tasks that need physical values (low-dose CT simulation).

`reader.read_dataset` windows every image to uint8 for classification; a CT simulation needs the
modality LUT's output (HU) instead. The same file checks (size limits, decoders, truncation) apply:
`load_dataset`, `check_image` and the decoder checks are the reader's own.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from edge_client.ingest.errors import QuarantineError
from edge_client.ingest.limits import Limits, check_image
from edge_client.ingest.reader import _check_decoder, _decode, load_dataset
from fedge.errors import NotFoundError, UsageError

# Below air: scanners pad outside the reconstruction circle with -1500..-3024 HU.
AIR_HU = -1024.0


class NoCtError(UsageError):
    """A --ct-dir without one readable CT slice."""


@dataclass(frozen=True)
class CtSeries:
    """One series' slices in HU, sorted along the patient axis. UIDs stay on the device."""

    series_uid: str
    hu: np.ndarray  # (slices, rows, cols) float32, clipped below at AIR_HU
    pixel_mm: float  # in-plane spacing (square pixels assumed; the row spacing)
    source: str  # the folder, for messages and the cache key's provenance

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or len(self.hu) == 0:
            raise ValueError(f"CtSeries.hu must be (slices, rows, cols) with at least one slice, got {self.hu.shape}")


def _position(ds: Dataset) -> tuple[float, int]:
    z = ds.get("ImagePositionPatient")
    return (float(z[2]) if z is not None and len(z) == 3 else 0.0, int(ds.get("InstanceNumber", 0) or 0))


def _hu(ds: Dataset, limits: Limits) -> np.ndarray:
    check_image(ds, 1, limits)
    _check_decoder(ds)
    return np.maximum(apply_modality_lut(_decode(ds), ds).astype(np.float32), AIR_HU)


def read_ct_dir(folder: str | os.PathLike[str], *, limits: Limits = Limits(), min_slices: int = 1) -> list[CtSeries]:
    """Every CT series under `folder` (recursively), in HU. Unreadable files and other modalities are
    skipped; a folder with no CT slice at all raises NoCtError naming what was found instead."""
    root = Path(folder)
    if not root.is_dir():
        raise NotFoundError(f"--ct-dir {root} is not a folder; pass a folder of CT DICOM files (e.g. $FEDGE_DATA_DIR/ct/ge_head_human_28slice)")
    slices: dict[str, list[tuple[tuple[float, int], np.ndarray, float]]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = load_dataset(path, limits)
            modality = str(ds.get("Modality", "")).upper() or "no modality"
            if modality != "CT":
                skipped[f"modality {modality}"] += 1
                continue
            if int(ds.get("NumberOfFrames", 1) or 1) != 1 or "PixelData" not in ds:
                skipped["CT without a single-frame image"] += 1
                continue
            hu = _hu(ds, limits)
        except QuarantineError as exc:
            skipped[f"unreadable ({exc.reason.value})"] += 1
            continue
        spacing = ds.get("PixelSpacing")
        pixel_mm = float(spacing[0]) if spacing else 0.0
        if pixel_mm <= 0:
            skipped["CT without PixelSpacing"] += 1
            continue
        slices[str(ds.get("SeriesInstanceUID", "unknown"))].append((_position(ds), hu, pixel_mm))
    series = []
    for uid, items in slices.items():
        items.sort(key=lambda item: item[0])
        shapes = {item[1].shape for item in items}
        if len(shapes) != 1:
            shape = max(shapes, key=lambda s: sum(item[1].shape == s for item in items))
            skipped[f"CT slices of another size than {shape}"] += sum(item[1].shape != shape for item in items)
            items = [item for item in items if item[1].shape == shape]
        if len(items) >= min_slices:
            series.append(CtSeries(uid, np.stack([item[1] for item in items]), items[0][2], str(root)))
    if not series:
        found = ", ".join(f"{n} {what}" for what, n in sorted(skipped.items())) or "no files"
        raise NoCtError(
            f"--ct-dir {root} holds no readable CT series (found: {found}). Pass a folder of CT DICOM slices "
            f"(Modality CT, with PixelSpacing), e.g. $FEDGE_DATA_DIR/ct/ge_head_human_28slice"
        )
    return series
