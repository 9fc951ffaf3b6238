"""Entropy stage: zstd over the whole packed payload, decompressed against a hard output bound:
what the codec can write for the receiver's manifest, checked before anything is inflated."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import zstandard

from compression.codecs.base import CodecError, Stage, parse_int, register_stage

_UNKNOWN_SIZE = zstandard.CONTENTSIZE_UNKNOWN


class EntropyCoder(Stage):
    kind = "entropy"
    lossless = True

    @abstractmethod
    def compress(self, data: bytes) -> bytes: ...

    @abstractmethod
    def decompress(self, data: bytes, bound: int) -> bytes:
        """Inverse of compress; never produces (or allocates) more than `bound` bytes."""


@register_stage
@dataclass(frozen=True)
class Zstd(EntropyCoder):
    name: ClassVar[str] = "zstd"
    DEFAULT_LEVEL: ClassVar[int] = 3
    level: int = 3

    @classmethod
    def from_arg(cls, arg: str | None) -> Zstd:
        return cls(parse_int(cls.name, arg, cls.DEFAULT_LEVEL, 1, 22))

    def token(self) -> str:
        return self.name if self.level == self.DEFAULT_LEVEL else f"{self.name}:{self.level}"

    def compress(self, data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, data: bytes, bound: int) -> bytes:
        """Only frames that declare their size (ours always do), so what is allocated is known before
        a byte is inflated: a frame without one would make zstandard allocate the whole bound."""
        try:
            declared = zstandard.get_frame_parameters(data).content_size
            if declared == _UNKNOWN_SIZE:
                raise CodecError("zstd frame does not declare its content size; fedge's encoder always does")
            if declared > bound:
                raise CodecError(f"zstd frame declares {declared} bytes, over the {bound} this codec writes for this manifest")
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=bound, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"payload is not a valid zstd frame: {exc}") from None
