"""Server-side weighted mean of decoded updates that never densifies a sparse one.

A sparse update touches only its k indices (unique by SparseTensor's contract, so a fancy-index
add is exact): cost O(k) per update instead of O(numel). Sums live in one flat float32 buffer,
the model's own precision and what a dense (Flower-style) average uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from compression.codecs.base import CodecError, SparseTensor, TensorSpec


class SparseAccumulator:
    """sum(w * update) / sum(w) over the tensors of one manifest."""

    def __init__(self, manifest: list[TensorSpec]) -> None:
        self._specs = {spec.name: spec for spec in manifest}
        if len(self._specs) != len(manifest):
            raise CodecError("manifest repeats tensor names; one accumulator slot per tensor")
        self._offsets = dict(zip(self._specs, np.cumsum([0] + [s.numel for s in manifest]).tolist()))
        self._flat = np.zeros(sum(s.numel for s in manifest), dtype=np.float32)
        self._weight = 0.0

    @property
    def total_weight(self) -> float:
        return self._weight

    def _slot(self, buffer: np.ndarray, name: str) -> np.ndarray:
        start = self._offsets[name]
        return buffer[start : start + self._specs[name].numel]

    def add(self, decoded: Mapping[str, np.ndarray | SparseTensor], weight: float) -> None:
        """Add one client's decoded update with its weight (typically its sample count)."""
        if not (math.isfinite(weight) and weight > 0):
            raise CodecError(f"update weight must be a positive finite number (e.g. the sample count), got {weight!r}")
        if decoded.keys() != self._specs.keys():
            missing, extra = sorted(set(self._specs) - set(decoded)), sorted(set(decoded) - set(self._specs))
            raise CodecError(f"update does not match the round's manifest: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, update in decoded.items():
            if update.shape != self._specs[name].shape:
                raise CodecError(f"tensor {name!r}: update of shape {update.shape}, manifest says {self._specs[name].shape}")
        w = np.float32(weight)
        for name, update in decoded.items():
            slot = self._slot(self._flat, name)
            if isinstance(update, SparseTensor):
                slot[update.indices] += w * update.values
            else:
                slot += w * update.reshape(-1).astype(np.float32, copy=False)
        self._weight += weight

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean as float32 arrays in manifest shapes (views of one fresh buffer)."""
        if self._weight == 0.0:
            raise CodecError("no updates were added; the round has nothing to aggregate")
        mean = self._flat * np.float32(1.0 / self._weight)
        return {name: self._slot(mean, name).reshape(spec.shape) for name, spec in self._specs.items()}
