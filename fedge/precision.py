"""Numeric precisions, one list for the exporters, the device profiles and the CLI (no torch here,
so `fedge --help` and the profile loader can use it)."""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
BYTES_PER_ELEMENT: dict[Precision, int] = {"fp32": 4, "fp16": 2, "int8": 1}
