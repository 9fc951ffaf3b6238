"""Splitting envelopes into MQTT-sized chunks and putting them back together.

Chunk layout: b"FCK1" | 16-byte transfer id | u32 index | u32 count | u64 total length | data.
Reassembly tolerates duplicates and any order; every field is checked against limits before a
byte is stored, and the number of open transfers is bounded so garbage cannot exhaust memory.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from fedge.protocol.errors import ProtocolError

MAGIC = b"FCK1"
_HEAD = struct.Struct(">4s16sIIQ")
DEFAULT_CHUNK_SIZE = 256 * 1024


@dataclass(frozen=True)
class Chunk:
    transfer: bytes
    index: int
    count: int
    total: int
    data: bytes

    def encode(self) -> bytes:
        return _HEAD.pack(MAGIC, self.transfer, self.index, self.count, self.total) + self.data

    @classmethod
    def decode(cls, raw: bytes) -> "Chunk":
        if len(raw) < _HEAD.size:
            raise ProtocolError(f"chunk of {len(raw)} bytes is shorter than its {_HEAD.size}-byte header")
        magic, transfer, index, count, total = _HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise ProtocolError(f"bad chunk magic {magic!r}")
        if count == 0 or index >= count:
            raise ProtocolError(f"chunk index {index} out of range for count {count}")
        return cls(transfer, index, count, total, raw[_HEAD.size :])


def split_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, transfer: bytes | None = None) -> list[Chunk]:
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    transfer = transfer or secrets.token_bytes(16)
    count = max(1, math.ceil(len(data) / chunk_size))
    return [Chunk(transfer, i, count, len(data), data[i * chunk_size : (i + 1) * chunk_size]) for i in range(count)]


@dataclass
class _Partial:
    count: int
    total: int
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunks per (key, transfer id); `add` returns the whole message once complete.

    With `one_per_key`, a key (a sender) holds one open transfer: a new transfer id replaces the
    old one, so a sender can never hold more than one transfer's worth of memory."""

    def __init__(self, max_bytes: int = 512 << 20, max_chunks: int = 65_536, max_open: int = 64, one_per_key: bool = False):
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self.max_open = max_open
        self.one_per_key = one_per_key
        self._open: OrderedDict[tuple[str, bytes], _Partial] = OrderedDict()

    def add(self, key: str, chunk: Chunk, max_bytes: int | None = None) -> bytes | None:
        """`max_bytes` tightens the limit for this sender (e.g. what its announced manifest implies)."""
        limit = min(self.max_bytes, max_bytes if max_bytes is not None else self.max_bytes)
        if chunk.total > limit:
            raise ProtocolError(f"transfer declares {chunk.total} bytes, over the {limit}-byte limit")
        if chunk.count > self.max_chunks or chunk.count > max(1, chunk.total):
            raise ProtocolError(f"transfer declares {chunk.count} chunks for {chunk.total} bytes")
        slot = (key, chunk.transfer)
        partial = self._open.get(slot)
        if partial is None:
            if self.one_per_key:
                self.discard_key(key)
            partial = _Partial(chunk.count, chunk.total)
            self._open[slot] = partial
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)  # drop the oldest unfinished transfer
        elif (partial.count, partial.total) != (chunk.count, chunk.total):
            raise ProtocolError(f"chunk {chunk.index} disagrees with its transfer on count/total")
        self._open.move_to_end(slot)
        if chunk.index in partial.parts:
            return None  # duplicate delivery (QoS 1 may redeliver): ignore
        if partial.size + len(chunk.data) > partial.total:
            del self._open[slot]
            raise ProtocolError(f"chunks exceed the declared {partial.total} bytes; transfer dropped")
        partial.parts[chunk.index] = chunk.data
        partial.size += len(chunk.data)
        if len(partial.parts) < partial.count:
            return None
        del self._open[slot]
        if partial.size != partial.total:
            raise ProtocolError(f"transfer complete with {partial.size} bytes, declared {partial.total}")
        return b"".join(partial.parts[i] for i in range(partial.count))

    def discard(self, key_prefix: str) -> None:
        """Forget unfinished transfers under a key prefix (e.g. a round that closed)."""
        for slot in [s for s in self._open if s[0].startswith(key_prefix)]:
            del self._open[slot]

    def discard_key(self, key: str) -> None:
        for slot in [s for s in self._open if s[0] == key]:
            del self._open[slot]

    @property
    def open_bytes(self) -> int:
        return sum(p.size for p in self._open.values())

    @property
    def open_transfers(self) -> int:
        return len(self._open)
