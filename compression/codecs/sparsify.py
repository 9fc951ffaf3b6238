"""Sparsifiers: which entries of each tensor travel. Each returns sorted unique int64 indices."""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from compression.codecs.base import CodecSpecError, Stage, parse_fraction, register_stage


def keep_count(fraction: float, numel: int) -> int:
    """k = round(fraction x numel), at least 1 so no tensor goes silent for ever."""
    return max(1, min(numel, round(fraction * numel)))


class Sparsifier(Stage):
    kind = "sparsifier"

    @abstractmethod
    def select(self, flat: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Indices to keep for each 1-D float32 tensor in `flat`."""

    def count_bounds(self, numel: int) -> tuple[int, int]:
        """The fewest and most entries `select` keeps of one tensor of `numel`: what a decoder accepts."""
        return 0, numel

    def total_count(self, numel: int) -> int | None:
        """The entries `select` keeps over all the tensors it was given, `numel` in all (None: any)."""
        return None


class PerTensorSparsifier(Sparsifier):
    """A sparsifier whose choice for one tensor does not depend on the others."""

    def select(self, flat: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {name: self.select_one(x, rng) for name, x in flat.items()}

    @abstractmethod
    def select_one(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


class FractionArg:
    """Sparsifiers whose one argument is the kept fraction, written `name:FRACTION` in a spec."""

    name: ClassVar[str]
    fraction: float

    @classmethod
    def from_arg(cls, arg: str | None):
        return cls(parse_fraction(cls.name, arg))  # type: ignore[call-arg]  # a mixin: the concrete dataclass takes `fraction`

    def token(self) -> str:
        return f"{self.name}:{self.fraction!r}"


def _largest(magnitude: np.ndarray, k: int) -> np.ndarray:
    if k >= magnitude.size:
        return np.arange(magnitude.size, dtype=np.int64)
    return np.sort(np.argpartition(magnitude, magnitude.size - k)[magnitude.size - k :]).astype(np.int64)


@register_stage
@dataclass(frozen=True)
class TopK(FractionArg, PerTensorSparsifier):
    """The largest-magnitude fraction of each tensor (DGC-style)."""

    name: ClassVar[str] = "topk"
    fraction: float

    def select_one(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _largest(np.abs(x), keep_count(self.fraction, x.size))

    def count_bounds(self, numel: int) -> tuple[int, int]:
        return keep_count(self.fraction, numel), keep_count(self.fraction, numel)


@register_stage
@dataclass(frozen=True)
class GlobalTopK(FractionArg, Sparsifier):
    """The largest-magnitude fraction over all tensors together: one global threshold, so layers
    with large updates get more of the budget."""

    name: ClassVar[str] = "gtopk"
    fraction: float

    def select(self, flat: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if not flat:
            return {}
        sizes = [x.size for x in flat.values()]
        magnitude = np.abs(np.concatenate(list(flat.values())))
        chosen = _largest(magnitude, keep_count(self.fraction, magnitude.size))
        bounds = np.searchsorted(chosen, np.cumsum([0, *sizes]))
        offsets = np.cumsum([0, *sizes])
        return {name: chosen[bounds[i] : bounds[i + 1]] - offsets[i] for i, name in enumerate(flat)}

    def total_count(self, numel: int) -> int | None:
        return keep_count(self.fraction, numel) if numel else 0


@register_stage
@dataclass(frozen=True)
class Threshold(PerTensorSparsifier):
    """Every entry with |x| >= VALUE; the count varies with the update's scale."""

    name: ClassVar[str] = "thresh"
    value: float

    @classmethod
    def from_arg(cls, arg: str | None) -> Threshold:
        try:
            value = float(arg) if arg is not None else math.nan
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise CodecSpecError(f"stage 'thresh' needs a positive magnitude, e.g. thresh:1e-3 (got {arg!r})")
        return cls(value)

    def token(self) -> str:
        return f"{self.name}:{self.value!r}"

    def select_one(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.flatnonzero(np.abs(x) >= self.value).astype(np.int64)


@register_stage
@dataclass(frozen=True)
class RandomK(FractionArg, PerTensorSparsifier):
    """A uniformly random fraction of each tensor (values unscaled: pair with `ef`)."""

    name: ClassVar[str] = "randk"
    fraction: float

    def select_one(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        k = keep_count(self.fraction, x.size)
        return np.sort(rng.choice(x.size, size=k, replace=False)).astype(np.int64)

    def count_bounds(self, numel: int) -> tuple[int, int]:
        return keep_count(self.fraction, numel), keep_count(self.fraction, numel)
