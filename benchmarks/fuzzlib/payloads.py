"""Codec payloads and manifests for the codec target and the envelopes of the handler targets:
genuine encodings mutated inside and outside the zstd frame, hand-built tensor records,
decompression bombs and manifests at the edge of what decoders accept."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import zstandard

from compression import TensorSpec, UpdateCodec
from fuzzlib.mutate import INTERESTING_INTS, mutate_bytes

SPECS = (
    "fp32", "fp16", "q8", "q8:8", "q4|zstd:1", "ternary", "fp32|zstd", "fp32|zstd:1", "topk:0.1|fp32",
    "topk:0.3,ef|q8|zstd", "gtopk:0.2|q4:16", "thresh:0.5|fp16", "randk:0.5|ternary|zstd", "topk:0.01,ef|ternary|zstd",
)  # fmt: skip
Manifest = list[tuple[str, tuple[int, ...]]]
# Manifests a hostile header can declare within the envelope schema (dimensions up to 2^31).
HOSTILE_MANIFESTS: tuple[Manifest, ...] = (
    [("w", (1 << 29,))],
    [("w", (1 << 31,))],
    [("w", (1 << 16, 1 << 15))],
    [("a", (4,)), ("b", (1 << 28,))],
    [("w", (1 << 31,) * 8)],
    [("w", (0,))],
    [("a", (1,))] * 40_000,
    [(f"t{i}", (1 << 20,)) for i in range(64)],
)


def small_manifest(rng: random.Random) -> Manifest:
    return [(f"t{i}", tuple(rng.randint(1, 9) for _ in range(rng.randint(0, 3)))) for i in range(rng.randint(1, 4))]


def specs_of(manifest: Manifest) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(shape)) for name, shape in manifest]


def random_delta(rng: random.Random, manifest: Manifest) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(rng.randrange(1 << 32))
    scale = rng.choice([1e-3, 1.0, 1e3])
    return {name: np.asarray(gen.standard_normal(shape) * scale, dtype=np.float32) for name, shape in manifest}


@functools.lru_cache(maxsize=16)
def zero_frame(size: int, declare: bool) -> bytes:
    """A zstd frame of `size` zero bytes (a few KB for 64 MiB), with or without its content size."""
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=declare)
    obj = cctx.compressobj(size=size if declare else -1)
    block = bytes(min(size, 1 << 20))
    parts = [obj.compress(block[: min(len(block), size - done)]) for done in range(0, size, len(block))]
    return b"".join(parts) + obj.flush()


def crafted_plaintext(rng: random.Random, manifest: Manifest) -> bytes:
    """A hand-built tensor stream: version byte, then per tensor a kind byte, counts at the edges
    and a body of plausible or implausible length."""
    out = bytearray([rng.choice([1, 1, 1, 0, 2, 255])])
    for _name, shape in manifest[: rng.randint(0, len(manifest) + 1)]:
        numel = math.prod(shape)
        kind = rng.choice([0, 1, 1, 2, 3, rng.randrange(256)])
        out.append(kind)
        if kind in (1,):
            count = rng.choice([0, 1, numel, numel + 1, rng.choice(INTERESTING_INTS), 1 << 35])
            while True:
                byte, count = count & 0x7F, count >> 7
                out.append(byte | (0x80 if count else 0))
                if not count:
                    break
        out += rng.choice([b"", bytes(4), rng.randbytes(rng.randrange(64)), b"\xff" * rng.randrange(1, 64), bytes(min(4 * numel, 4096))])
    return bytes(out)


def payload(rng: random.Random, spec: str, manifest: Manifest) -> tuple[str, bytes]:
    """(scenario, payload) for `spec` over `manifest`: a mutated genuine encoding when the
    manifest is small enough to encode, else hand-built records and bombs."""
    codec = UpdateCodec.from_spec(spec)
    numel = sum(math.prod(s) for _, s in manifest)
    pick = rng.randrange(10)
    if pick < 5 and numel <= 1 << 16 and all(d > 0 for _, s in manifest for d in s):
        delta = random_delta(rng, manifest)
        keep = [n for n, _ in manifest if rng.random() < 0.2]
        plain = codec.encode(delta, keep_dense=keep, seed=rng.randrange(1 << 16))
        if codec.entropy is not None and rng.random() < 0.6:
            inner = zstandard.ZstdDecompressor().decompress(plain)
            return "mutated-plaintext", zstandard.ZstdCompressor(level=1).compress(mutate_bytes(rng, inner))
        return "mutated-encoding", mutate_bytes(rng, plain) if rng.random() < 0.9 else plain
    if pick < 7:
        plain = crafted_plaintext(rng, manifest)
        return "crafted", zstandard.ZstdCompressor(level=1).compress(plain) if codec.entropy is not None else plain
    if pick < 8:
        empty = b"\x01" + b"\x01\x00" * len(manifest)  # every tensor sparse with no entries
        return "empty-sparse", zstandard.ZstdCompressor(level=1).compress(empty) if codec.entropy is not None else empty
    size = rng.choice([1 << 10, 1 << 20, 64 << 20, 4 * numel + len(manifest) + 1])
    frame = zero_frame(min(size, 256 << 20), rng.random() < 0.7)
    return "zstd-bomb", frame + (rng.randbytes(rng.randrange(1, 8)) if rng.random() < 0.1 else b"")
