"""Wire objects, errors, byte readers and the stage registry shared by every update codec.

Everything that reads untrusted bytes goes through `Reader`, whose every take is bounds-checked,
so a decoder can only allocate in proportion to bytes that are actually present.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

FLOAT_DTYPES = ("float16", "float32", "float64")
# Index arithmetic stays in int64 without overflow as long as one tensor holds fewer elements.
MAX_TENSOR_NUMEL = 1 << 31
MAX_DIMS = 16


class CodecError(ValueError):
    """An update could not be encoded or decoded; the message says why and what to do."""


class CodecSpecError(CodecError):
    """A codec spec string is malformed; the message names the bad token and the valid choices."""


def describe(value: Any, limit: int = 60) -> str:
    """A short, safe rendering of an untrusted value for an error message: never recursive, never
    a 5,000-digit number (whose str() raises), never longer than about `limit` characters."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, list | tuple) and len(value) <= MAX_DIMS and all(type(v) is int for v in value):
        text = "(" + ", ".join(describe(v) for v in value) + ")"
        return text if len(text) <= 4 * limit else text[: 4 * limit] + "...)"
    return f"<{type(value).__name__}>"


@dataclass(frozen=True)
class TensorSpec:
    """One manifest entry: what the decoder must produce, and the bound it allocates against."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CodecError(f"tensor name must be a non-empty string, got {describe(self.name)}")
        shape = self.shape
        if not isinstance(shape, tuple) or len(shape) > MAX_DIMS or not all(type(d) is int and 0 < d <= MAX_TENSOR_NUMEL for d in shape):
            raise CodecError(
                f"tensor {describe(self.name)}: shape must be a tuple of at most {MAX_DIMS} ints in [1, {MAX_TENSOR_NUMEL}], got {describe(shape)}"
            )
        if self.numel > MAX_TENSOR_NUMEL:
            raise CodecError(f"tensor {describe(self.name)} has over {MAX_TENSOR_NUMEL} elements, more than one payload holds")
        if not isinstance(self.dtype, str) or self.dtype not in FLOAT_DTYPES:
            raise CodecError(f"tensor {describe(self.name)}: dtype {describe(self.dtype)} is not one of {', '.join(FLOAT_DTYPES)}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any) -> TensorSpec:
        """Build from an (untrusted) envelope header entry; anything malformed is a CodecError."""
        if not isinstance(data, dict) or set(data) - {"name", "shape", "dtype"} or not {"name", "shape"} <= set(data):
            raise CodecError(f"manifest entry must be an object with keys name, shape[, dtype], got {describe(data)}")
        shape = data["shape"]
        if not isinstance(shape, list | tuple):
            raise CodecError(f"manifest entry {describe(data['name'])}: shape must be a list of at most {MAX_DIMS} ints, got {describe(shape)}")
        return cls(name=data["name"], shape=tuple(shape), dtype=data.get("dtype", "float32"))


def validate_manifest(manifest: list[TensorSpec], max_output_bytes: int | None) -> None:
    """Check names are unique and the decoded float32 output fits the bound (None: the caller
    holds the manifest), before any allocation; linear in the manifest's length."""
    if not isinstance(manifest, list | tuple) or not all(isinstance(s, TensorSpec) for s in manifest):
        raise CodecError("manifest must be a list of TensorSpec (build entries with TensorSpec.from_json)")
    counts = Counter(s.name for s in manifest)
    if len(counts) != len(manifest):
        repeated = [describe(name, 40) for name, n in counts.items() if n > 1][:5]
        raise CodecError(f"manifest repeats tensor names: {', '.join(repeated)}")
    total = 4 * sum(s.numel for s in manifest)
    if max_output_bytes is not None and total > max_output_bytes:
        raise CodecError(f"manifest describes {total} bytes of float32 output, over max_output_bytes={max_output_bytes}")


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A decoded sparse update: flat sorted unique int64 indices into `shape`, float32 values."""

    shape: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        idx, val = self.indices, self.values
        if idx.dtype != np.int64 or val.dtype != np.float32 or idx.ndim != 1 or val.shape != idx.shape:
            raise CodecError("SparseTensor needs 1-D int64 indices and float32 values of the same length")
        if idx.size and (idx[0] < 0 or idx[-1] >= numel or (idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])))):
            raise CodecError(f"SparseTensor indices must be strictly increasing within [0, {numel})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)


class Reader:
    """Bounds-checked cursor over untrusted bytes: every read names what ran short."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise CodecError(f"payload truncated: {what} needs {n} bytes, {self.remaining} left")
        out = self._view[self._pos : self._pos + n]
        self._pos += n
        return out

    def peek(self, n: int) -> memoryview:
        """Up to `n` bytes from the cursor without consuming them (for self-delimiting codes)."""
        return self._view[self._pos : self._pos + min(n, self.remaining)]

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """`count` little-endian items, copied so callers own writable memory."""
        dt = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt).astype(dt.newbyteorder("="), copy=True)

    def byte(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def varint(self, what: str, limit: int) -> int:
        """An unsigned LEB128 integer that must not exceed `limit`."""
        value = shift = 0
        while True:
            b = self.byte(what)
            value |= (b & 0x7F) << shift
            if value > limit:
                raise CodecError(f"{what} is {value}, over its limit {limit}")
            if b < 0x80:
                return value
            shift += 7

    def finish(self) -> None:
        if self.remaining:
            raise CodecError(f"payload has {self.remaining} trailing bytes after the last tensor; it does not match the manifest")


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def require_finite(values: np.ndarray, what: str) -> None:
    if not bool(np.isfinite(values).all()):
        raise CodecError(f"{what} contains NaN or Inf")


StageKind = Literal["sparsifier", "values", "entropy"]
S = TypeVar("S", bound="Stage")


class Stage(ABC):
    """One pipeline step, written `name[:arg][,flag]` in a spec and registered by name."""

    name: ClassVar[str]
    kind: ClassVar[StageKind]
    lossless: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_arg(cls: type[S], arg: str | None) -> S:
        """Build from the text after ':' (None when absent); raise CodecSpecError naming the fix."""

    @abstractmethod
    def token(self) -> str:
        """Canonical text of this stage (defaults omitted)."""


STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[S]) -> type[S]:
    if cls.name in STAGES:
        raise ValueError(f"codec stage {cls.name!r} is already registered by {STAGES[cls.name].__qualname__}")
    STAGES[cls.name] = cls
    return cls


def no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise CodecSpecError(f"stage {name!r} takes no argument, got {name}:{arg}; write just {name!r}")


def parse_fraction(name: str, arg: str | None) -> float:
    if arg is None:
        raise CodecSpecError(f"stage {name!r} needs a fraction in (0, 1], e.g. {name}:0.01")
    try:
        value = float(arg)
    except ValueError:
        raise CodecSpecError(f"{name}:{arg}: {arg!r} is not a number; write a fraction in (0, 1], e.g. {name}:0.01") from None
    if not (0.0 < value <= 1.0):
        raise CodecSpecError(f"{name}:{arg}: the fraction must be in (0, 1], e.g. {name}:0.01")
    return value


def parse_int(name: str, arg: str | None, default: int, lo: int, hi: int) -> int:
    if arg is None:
        return default
    try:
        value = int(arg)
    except ValueError:
        raise CodecSpecError(f"{name}:{arg}: {arg!r} is not an integer; use {lo}..{hi} (default {default})") from None
    if not lo <= value <= hi:
        raise CodecSpecError(f"{name}:{arg}: must be in {lo}..{hi} (default {default})")
    return value
