"""The one shape of a tensor manifest: names, shapes and dtypes in model order, its digest, and its
wire form (the envelope header's entries). No values ever."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from compression import TensorSpec, UpdateCodec
from fedge.protocol import TensorEntry


@dataclass(frozen=True)
class Manifest:
    specs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> Manifest:
        return cls(tuple(UpdateCodec.manifest(state)))

    @classmethod
    def from_entries(cls, entries: Sequence[TensorEntry]) -> Manifest:
        return cls(tuple(TensorSpec(e.name, tuple(e.shape)) for e in entries))

    def entries(self) -> tuple[TensorEntry, ...]:
        """What an envelope header carries."""
        return tuple(TensorEntry(name=t.name, shape=tuple(t.shape)) for t in self.specs)

    @cached_property
    def digest(self) -> str:
        """Names and shapes: an update names its manifest by this instead of carrying it."""
        h = hashlib.sha256()
        for t in self.specs:
            h.update(f"{t.name}:{','.join(map(str, t.shape))};".encode())
        return h.hexdigest()

    def only(self, names: Collection[str]) -> Manifest:
        """The entries named, in this manifest's order (e.g. what a training mode sends)."""
        return Manifest(tuple(t for t in self.specs if t.name in names))

    def same_shapes(self, other: Manifest) -> bool:
        return [(t.name, tuple(t.shape)) for t in self.specs] == [(t.name, tuple(t.shape)) for t in other.specs]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.specs)

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)
