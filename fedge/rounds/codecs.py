"""Codec specs are parsed once per process, not once per use (an agent used to parse one three times a round)."""

from __future__ import annotations

from functools import lru_cache

from compression import UpdateCodec

FULL_MODEL_CODEC = "fp32|zstd:1"  # what carries a whole model: globals without a downlink codec, snapshots, the bench


@lru_cache(maxsize=64)
def codec_for(spec: str) -> UpdateCodec:
    """The parsed codec of `spec` (UpdateCodec is frozen: sharing one is safe). CodecSpecError on a bad spec."""
    return UpdateCodec.from_spec(spec)
