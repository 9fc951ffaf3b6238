"""Server-side weighted mean of decoded updates that never densifies a sparse one.

A sparse update touches only its k indices (unique by SparseTensor's contract, so a fancy-index
add is exact): cost O(k) per update instead of O(numel).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from compression.codecs.base import CodecError, SparseTensor, TensorSpec


class SparseAccumulator:
    """sum(w * update) / sum(w) over the tensors of one manifest, in float64."""

    def __init__(self, manifest: list[TensorSpec]) -> None:
        self._specs = {spec.name: spec for spec in manifest}
        if len(self._specs) != len(manifest):
            raise CodecError("manifest repeats tensor names; one accumulator slot per tensor")
        self._sums = {spec.name: np.zeros(spec.numel, dtype=np.float64) for spec in manifest}
        self._weight = 0.0

    @property
    def total_weight(self) -> float:
        return self._weight

    def add(self, decoded: Mapping[str, np.ndarray | SparseTensor], weight: float) -> None:
        """Add one client's decoded update with its weight (typically its sample count)."""
        if not (math.isfinite(weight) and weight > 0):
            raise CodecError(f"update weight must be a positive finite number (e.g. the sample count), got {weight!r}")
        if set(decoded) != set(self._specs):
            missing, extra = sorted(set(self._specs) - set(decoded)), sorted(set(decoded) - set(self._specs))
            raise CodecError(f"update does not match the round's manifest: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, update in decoded.items():
            spec, acc = self._specs[name], self._sums[name]
            if isinstance(update, SparseTensor):
                if update.shape != spec.shape:
                    raise CodecError(f"tensor {name!r}: sparse update of shape {update.shape}, manifest says {spec.shape}")
                acc[update.indices] += weight * update.values.astype(np.float64)
            else:
                if update.shape != spec.shape:
                    raise CodecError(f"tensor {name!r}: update of shape {update.shape}, manifest says {spec.shape}")
                acc += weight * update.reshape(-1).astype(np.float64)
        self._weight += weight

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean as float32 arrays in manifest shapes."""
        if self._weight == 0.0:
            raise CodecError("no updates were added; the round has nothing to aggregate")
        return {name: (acc / self._weight).astype(np.float32).reshape(self._specs[name].shape) for name, acc in self._sums.items()}
