"""Value coders: how the kept values of a tensor travel (fp32, fp16, block int8/int4, ternary).

`encode` returns the bytes and the values the receiver will reconstruct, so error feedback can
compute its residual without a second decode pass.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from compression.codecs.base import CodecError, Reader, Stage, no_arg, parse_int, register_stage, require_finite


class ValueCoder(Stage):
    kind = "values"

    @abstractmethod
    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        """Code 1-D float32 `values`; return (bytes, float32 reconstruction)."""

    @abstractmethod
    def decode(self, reader: Reader, count: int, what: str) -> np.ndarray:
        """Read `count` values (bounds-checked) and return them as 1-D float32."""

    @abstractmethod
    def max_bytes(self, count: int) -> int:
        """The bytes `encode` writes for `count` values: what a decoder may accept."""


@register_stage
@dataclass(frozen=True)
class Fp32(ValueCoder):
    """Raw little-endian float32: the lossless baseline every ratio is measured against."""

    name: ClassVar[str] = "fp32"
    lossless: ClassVar[bool] = True

    @classmethod
    def from_arg(cls, arg: str | None) -> Fp32:
        no_arg(cls.name, arg)
        return cls()

    def token(self) -> str:
        return self.name

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        return values.astype("<f4").tobytes(), values

    def max_bytes(self, count: int) -> int:
        return 4 * count

    def decode(self, reader: Reader, count: int, what: str) -> np.ndarray:
        out = reader.array("float32", count, f"{what} fp32 values")
        require_finite(out, what)
        return out


@register_stage
@dataclass(frozen=True)
class Fp16(ValueCoder):
    """Half precision: 2x smaller, ~3 significant digits, enough for deltas and BatchNorm statistics."""

    name: ClassVar[str] = "fp16"

    @classmethod
    def from_arg(cls, arg: str | None) -> Fp16:
        no_arg(cls.name, arg)
        return cls()

    def token(self) -> str:
        return self.name

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        if not bool(np.isfinite(half).all()):
            raise CodecError("a value exceeds the fp16 range (|x| > 65504); use fp32 or a block quantizer such as q8")
        return half.astype("<f2").tobytes(), half.astype(np.float32)

    def max_bytes(self, count: int) -> int:
        return 2 * count

    def decode(self, reader: Reader, count: int, what: str) -> np.ndarray:
        out = reader.array("float16", count, f"{what} fp16 values").astype(np.float32)
        require_finite(out, what)
        return out


@dataclass(frozen=True)
class BlockQuantizer(ValueCoder):
    """Symmetric integer codes with one float32 scale per block and stochastic rounding (unbiased).

    Wire: ceil(n/block) float32 scales, then the packed codes. Codes never use the most negative
    level, so a decoder can reject it as corruption.
    """

    block: int = 256
    levels: ClassVar[int]
    DEFAULT_BLOCK: ClassVar[int] = 256

    @classmethod
    def from_arg(cls, arg: str | None) -> BlockQuantizer:
        return cls(block=parse_int(cls.name, arg, cls.DEFAULT_BLOCK, 8, 1 << 16))

    def token(self) -> str:
        return self.name if self.block == self.DEFAULT_BLOCK else f"{self.name}:{self.block}"

    @abstractmethod
    def pack(self, codes: np.ndarray) -> bytes:
        """int8 codes in [-levels, levels] -> bytes."""

    @abstractmethod
    def packed_bytes(self, count: int) -> int:
        """Length of `pack` for `count` codes."""

    def max_bytes(self, count: int) -> int:
        return 4 * math.ceil(count / self.block) + self.packed_bytes(count)

    @abstractmethod
    def unpack(self, reader: Reader, count: int, what: str) -> np.ndarray:
        """bytes -> int8 codes, rejecting codes outside [-levels, levels] and non-zero padding."""

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        n = values.size
        nblocks = math.ceil(n / self.block)
        padded = np.zeros(nblocks * self.block, dtype=np.float32)
        padded[:n] = values
        blocks = padded.reshape(nblocks, self.block)
        scales = (np.abs(blocks).max(axis=1) / self.levels).astype(np.float32)
        safe = np.where(scales > 0, scales, np.float32(1.0))
        scaled = blocks / safe[:, None]
        scaled += rng.random(scaled.shape, dtype=np.float32)
        codes = np.clip(np.floor(scaled), -self.levels, self.levels).astype(np.int8).reshape(-1)[:n]
        recon = codes.astype(np.float32) * np.repeat(scales, self.block)[:n]
        return scales.astype("<f4").tobytes() + self.pack(codes), recon

    def decode(self, reader: Reader, count: int, what: str) -> np.ndarray:
        scales = reader.array("float32", math.ceil(count / self.block), f"{what} {self.name} scales")
        require_finite(scales, f"{what} {self.name} scales")
        if bool((scales < 0).any()):
            raise CodecError(f"{what}: negative {self.name} block scale; the payload is corrupt")
        codes = self.unpack(reader, count, what)
        with np.errstate(over="ignore"):
            out = codes.astype(np.float32) * np.repeat(scales, self.block)[:count]
        require_finite(out, what)
        return out


@register_stage
@dataclass(frozen=True)
class Q8(BlockQuantizer):
    name: ClassVar[str] = "q8"
    levels: ClassVar[int] = 127

    def pack(self, codes: np.ndarray) -> bytes:
        return codes.tobytes()

    def packed_bytes(self, count: int) -> int:
        return count

    def unpack(self, reader: Reader, count: int, what: str) -> np.ndarray:
        codes = reader.array("int8", count, f"{what} q8 codes")
        if bool((codes == -128).any()):
            raise CodecError(f"{what}: q8 code -128 is never written; the payload is corrupt")
        return codes


@register_stage
@dataclass(frozen=True)
class Q4(BlockQuantizer):
    """Two codes per byte as nibbles code+8 in 1..15 (low nibble first); 0 marks padding."""

    name: ClassVar[str] = "q4"
    levels: ClassVar[int] = 7

    def pack(self, codes: np.ndarray) -> bytes:
        nib = np.zeros(codes.size + (codes.size & 1), dtype=np.uint8)
        nib[: codes.size] = (codes + 8).astype(np.uint8)
        return (nib[0::2] | (nib[1::2] << 4)).tobytes()

    def packed_bytes(self, count: int) -> int:
        return (count + 1) // 2

    def unpack(self, reader: Reader, count: int, what: str) -> np.ndarray:
        packed = reader.array("uint8", (count + 1) // 2, f"{what} q4 codes")
        nib = np.empty(packed.size * 2, dtype=np.uint8)
        nib[0::2] = packed & 0x0F
        nib[1::2] = packed >> 4
        if bool((nib[:count] == 0).any()) or bool(nib[count:].any()):
            raise CodecError(f"{what}: invalid q4 nibble or non-zero padding; the payload is corrupt")
        return (nib[:count].astype(np.int16) - 8).astype(np.int8)


@register_stage
@dataclass(frozen=True)
class Ternary(ValueCoder):
    """STC-style: every kept value becomes sign x (mean magnitude of the kept values).

    Wire (nothing when count is 0): float32 mean magnitude, then one sign bit per value
    (1 = negative, little-endian bit order, zero padding). Zeros travel as +mean; pair with `ef`.
    """

    name: ClassVar[str] = "ternary"

    @classmethod
    def from_arg(cls, arg: str | None) -> Ternary:
        no_arg(cls.name, arg)
        return cls()

    def token(self) -> str:
        return self.name

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        if values.size == 0:
            return b"", values
        mu = np.float32(np.abs(values, dtype=np.float64).mean())
        negative = values < 0
        recon = np.where(negative, -mu, mu).astype(np.float32)
        return np.array([mu], dtype="<f4").tobytes() + np.packbits(negative, bitorder="little").tobytes(), recon

    def max_bytes(self, count: int) -> int:
        return 4 + (count + 7) // 8 if count else 0

    def decode(self, reader: Reader, count: int, what: str) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        mu = reader.array("float32", 1, f"{what} ternary magnitude")
        require_finite(mu, f"{what} ternary magnitude")
        if mu[0] < 0:
            raise CodecError(f"{what}: negative ternary magnitude; the payload is corrupt")
        bits = np.unpackbits(reader.array("uint8", (count + 7) // 8, f"{what} ternary signs"), bitorder="little")
        if bool(bits[count:].any()):
            raise CodecError(f"{what}: non-zero padding after the ternary sign bits; the payload is corrupt")
        return np.where(bits[:count].astype(bool), -mu[0], mu[0]).astype(np.float32)
