"""Index coding for sparse tensors: delta+varint or a bitmap, whichever is smaller per tensor.

No spec token: the encoder picks per tensor and writes the coder's tag as the tensor's kind byte.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from compression.codecs.base import CodecError, Reader, varint_bytes

# A gap is below MAX_TENSOR_NUMEL = 2**31, so it fits 5 varint bytes.
_MAX_VARINT_BYTES = 5


class IndexCoder(ABC):
    tag: ClassVar[int]

    @abstractmethod
    def size(self, indices: np.ndarray, numel: int) -> int:
        """Encoded length in bytes, computed without encoding."""

    @abstractmethod
    def encode(self, indices: np.ndarray, numel: int) -> bytes: ...

    @abstractmethod
    def decode(self, reader: Reader, numel: int, max_count: int, what: str) -> np.ndarray:
        """Strictly increasing int64 indices in [0, numel), at most `max_count` of them, validated before use."""

    @abstractmethod
    def max_bytes(self, numel: int, max_count: int) -> int:
        """The longest coding of at most `max_count` indices into `numel`."""


INDEX_CODERS: dict[int, IndexCoder] = {}


def register_index_coder(cls: type[IndexCoder]) -> type[IndexCoder]:
    if cls.tag in INDEX_CODERS:
        raise ValueError(f"index coder tag {cls.tag} is already registered by {type(INDEX_CODERS[cls.tag]).__qualname__}")
    INDEX_CODERS[cls.tag] = cls()
    return cls


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.empty(indices.size, dtype=np.uint64)
    if indices.size:
        gaps[0] = indices[0]
        gaps[1:] = np.diff(indices) - 1
    return gaps


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    lengths = np.ones(values.size, dtype=np.int64)
    for j in range(1, _MAX_VARINT_BYTES):
        lengths += values >= (1 << (7 * j))
    return lengths


@register_index_coder
class DeltaVarint(IndexCoder):
    """varint(count), then LEB128 gaps: first index, then (index - previous - 1)."""

    tag: ClassVar[int] = 1

    def size(self, indices: np.ndarray, numel: int) -> int:
        return len(varint_bytes(indices.size)) + int(_varint_lengths(_gaps(indices)).sum())

    def encode(self, indices: np.ndarray, numel: int) -> bytes:
        gaps = _gaps(indices)
        lengths = _varint_lengths(gaps)
        starts = np.cumsum(lengths) - lengths
        out = np.zeros(int(lengths.sum()), dtype=np.uint8)
        for j in range(_MAX_VARINT_BYTES):
            here = lengths > j
            more = (lengths > j + 1)[here]
            out[starts[here] + j] = ((gaps[here] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8) | (more.astype(np.uint8) << 7)
        return varint_bytes(indices.size) + out.tobytes()

    def max_bytes(self, numel: int, max_count: int) -> int:
        return _MAX_VARINT_BYTES * (max_count + 1)

    def decode(self, reader: Reader, numel: int, max_count: int, what: str) -> np.ndarray:
        count = reader.varint(f"{what} index count (entries kept)", max_count)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        window = np.frombuffer(reader.peek(count * _MAX_VARINT_BYTES), dtype=np.uint8)
        ends = np.flatnonzero(window < 0x80)[:count]
        if ends.size < count:
            raise CodecError(f"payload truncated: {what} declares {count} indices, fewer are present")
        starts = np.concatenate(([0], ends[:-1] + 1))
        if int((ends - starts).max()) >= _MAX_VARINT_BYTES:
            raise CodecError(f"{what}: an index gap is longer than {_MAX_VARINT_BYTES} bytes; the payload is corrupt")
        body = window[: ends[-1] + 1]
        group_start = np.repeat(starts, ends - starts + 1)
        shifts = (np.arange(body.size) - group_start) * 7
        gaps = np.add.reduceat((body & 0x7F).astype(np.int64) << shifts, starts)
        if int(gaps.max()) >= numel:
            raise CodecError(f"{what}: index gap out of range for a tensor of {numel} elements")
        gaps[1:] += 1
        indices = np.cumsum(gaps)
        if int(indices[-1]) >= numel:
            raise CodecError(f"{what}: index {int(indices[-1])} out of range for a tensor of {numel} elements")
        reader.take(body.size, what)
        return indices


@register_index_coder
class Bitmap(IndexCoder):
    """ceil(numel/8) bytes, bit i set when index i is kept (little-endian bit order, zero padding)."""

    tag: ClassVar[int] = 2

    def size(self, indices: np.ndarray, numel: int) -> int:
        return (numel + 7) // 8

    def encode(self, indices: np.ndarray, numel: int) -> bytes:
        mask = np.zeros(numel, dtype=bool)
        mask[indices] = True
        return np.packbits(mask, bitorder="little").tobytes()

    def max_bytes(self, numel: int, max_count: int) -> int:
        return (numel + 7) // 8

    def decode(self, reader: Reader, numel: int, max_count: int, what: str) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(reader.take((numel + 7) // 8, f"{what} bitmap"), dtype=np.uint8), bitorder="little")
        if bool(bits[numel:].any()):
            raise CodecError(f"{what}: non-zero bitmap padding; the payload is corrupt")
        count = int(bits.sum(dtype=np.int64))
        if count > max_count:
            raise CodecError(f"{what}: bitmap keeps {count} entries, more than this codec's {max_count}; the payload is not ours")
        return np.flatnonzero(bits[:numel]).astype(np.int64)


def encode_indices(indices: np.ndarray, numel: int) -> tuple[int, bytes]:
    """(tag, bytes) of the smaller coding for these indices."""
    coder = min(INDEX_CODERS.values(), key=lambda c: (c.size(indices, numel), c.tag))
    return coder.tag, coder.encode(indices, numel)
