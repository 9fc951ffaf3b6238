"""Caps checked before a file is read whole or its pixels are decoded.

A sender (a scanner, a PACS, anyone on the allow-list, or a file dropped in the inbox) decides how
large a file is and what Rows, Columns and NumberOfFrames say. Decoding trusts those numbers: a
1 x 65535 image, padded to a float32 square for resizing, asks for 16 GiB from 64 KB of pixels.
So sizes are checked from the file's length and the header alone, and refused with a reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataset import Dataset

from edge_client.ingest.errors import QuarantineError, Reason

MiB = 1 << 20
FLOAT32_BYTES = 4  # the reader works in float32 between decode and the final uint8


@dataclass(frozen=True)
class Limits:
    """Per-input caps. Defaults take every real image we know of (mammograms, multi-frame CT, US cine of
    a few hundred frames) and keep one input's working memory to a few GiB at most.

    max_file_bytes: file (or received dataset) length, checked before it is read.
    max_side: Rows and Columns each.
    max_frames: NumberOfFrames.
    max_pixels: frames x rows x columns x samples per pixel, what the decoder allocates.
    max_padded_bytes: one frame padded to a float32 square (side^2 x channels x 4), what an extreme
        aspect ratio blows up; frames are resized in batches, so this bounds the padding per frame.
    """

    max_file_bytes: int = 1024 * MiB
    max_side: int = 16384
    max_frames: int = 4096
    max_pixels: int = 1 << 27
    max_padded_bytes: int = 512 * MiB

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_side", "max_frames", "max_pixels", "max_padded_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name}={getattr(self, name)}: use a positive number")


def check_length(source: str | os.PathLike[str] | BinaryIO, limits: Limits) -> None:
    """Refuse a file or stream longer than max_file_bytes, from its size alone (nothing is read)."""
    if isinstance(source, (str, os.PathLike)):
        size = os.stat(source).st_size
    else:
        here = source.tell()
        size = source.seek(0, os.SEEK_END) - here
        source.seek(here)
    if size > limits.max_file_bytes:
        raise QuarantineError(Reason.TOO_LARGE, f"{size} bytes; the cap is {limits.max_file_bytes} ({limits.max_file_bytes // MiB} MiB, --max-file-mb)")


def _count(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value if value not in (None, "") else default)
    except (TypeError, ValueError) as exc:
        raise QuarantineError(Reason.BAD_HEADER, f"{keyword} {value!r} is not a whole number") from exc
    if number < 1:
        raise QuarantineError(Reason.BAD_HEADER, f"{keyword} {number}: must be at least 1")
    return number


def check_image(ds: Dataset, channels: int, limits: Limits) -> None:
    """Refuse, from header values alone, an image whose decode or padding would exceed the caps."""
    rows, cols = _count(ds, "Rows", 0), _count(ds, "Columns", 0)
    frames, samples = _count(ds, "NumberOfFrames", 1), _count(ds, "SamplesPerPixel", 1)
    if max(rows, cols) > limits.max_side:
        raise QuarantineError(Reason.TOO_LARGE, f"{rows} x {cols} pixels; the cap is {limits.max_side} a side")
    if frames > limits.max_frames:
        raise QuarantineError(Reason.TOO_LARGE, f"{frames} frames; the cap is {limits.max_frames}")
    pixels = frames * rows * cols * samples
    if pixels > limits.max_pixels:
        raise QuarantineError(Reason.TOO_LARGE, f"{frames} x {rows} x {cols} x {samples} = {pixels} samples to decode; the cap is {limits.max_pixels}")
    side = max(rows, cols)
    padded = side * side * channels * FLOAT32_BYTES
    if padded > limits.max_padded_bytes:
        raise QuarantineError(
            Reason.TOO_LARGE,
            f"{rows} x {cols} padded to a {side} x {side} float32 square is {padded // MiB} MiB a frame "
            f"(aspect ratio {side / min(rows, cols):.0f}:1); the cap is {limits.max_padded_bytes // MiB} MiB",
        )
