"""Versioned, hashed, optionally Ed25519-signed envelopes.

Layout: b"FDG1" | u32 header length | header JSON | payload | [64-byte signature].
The header is a strict allow-list (pydantic, extra fields forbidden): an agent can only ever send
these fields, and metrics only under the names in ALLOWED_METRICS, so nothing identifying a
patient can ride along in metadata.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedge.protocol.errors import ProtocolError, first_error
from fedge.protocol.signing import SIGNATURE_BYTES, SignatureError, Signer, Verifier

MAGIC = b"FDG1"
_PREFIX = struct.Struct(">4sI")
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 100_000
ALLOWED_METRICS = frozenset({"train_loss", "train_accuracy", "train_seconds", "encode_seconds", "val_auc", "val_accuracy", "peak_mem_mb", "epochs"})
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
RUN_PATTERN = r"^[0-9a-f]{32}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


# Dimensions are checked by pydantic-core, not a Python validator per entry (40,000 entries fit 1 MiB).
Dim = Annotated[int, Field(ge=0, le=1 << 31)]


class TensorEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+$")
    shape: tuple[Dim, ...] = Field(max_length=8, fail_fast=True)
    dtype: Literal["float32"] = "float32"


class EnvelopeHeader(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    kind: Literal["update", "global"]
    federation: str = Field(pattern=NAME_PATTERN)
    round: int = Field(ge=0, le=10**9)
    sender: str = Field(pattern=NAME_PATTERN)
    codec: str = Field(min_length=1, max_length=256)
    # fail_fast: 520,000 invalid entries in a 1 MiB header are one error, not 520,000 collected ones.
    manifest: tuple[TensorEntry, ...] = Field(default=(), max_length=MAX_TENSORS, fail_fast=True)
    # Updates name the manifest by digest: the server already holds it, and ~1.5 KB of tensor
    # names per update would dominate a top-0.1% payload. Globals carry the full manifest.
    manifest_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    num_samples: int = Field(default=0, ge=0, le=10**9)
    metrics: dict[str, float] = Field(default_factory=dict)
    base_round: int | None = Field(default=None, ge=0)
    model: dict[str, Any] | None = None  # the model config, on global envelopes only
    # The server's run and, on updates, the announced global the update was trained from: a
    # signed update recorded in one run or round means nothing in another.
    run: str | None = Field(default=None, pattern=RUN_PATTERN)
    model_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    nonce: str = Field(default_factory=lambda: secrets.token_hex(16), pattern=r"^[0-9a-f]{32}$")
    payload_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    payload_len: int = Field(default=0, ge=0)
    signed: bool = False

    @field_validator("metrics", mode="before")
    @classmethod
    def _few_metrics(cls, metrics: object) -> object:
        """Counted before the values are validated: 60,000 bad metrics would be 60,000 errors."""
        if isinstance(metrics, dict) and len(metrics) > len(ALLOWED_METRICS):
            raise ValueError(f"at most {len(ALLOWED_METRICS)} metrics, got {len(metrics)}")
        return metrics

    @field_validator("metrics")
    @classmethod
    def _allowed_metrics(cls, metrics: dict[str, float]) -> dict[str, float]:
        unknown = set(metrics) - ALLOWED_METRICS
        if unknown:
            raise ValueError(f"metrics {sorted(unknown)} are not on the allow-list {sorted(ALLOWED_METRICS)}")
        return metrics


@dataclass(frozen=True)
class Envelope:
    header: EnvelopeHeader
    payload: bytes


def encode_envelope(header: EnvelopeHeader, payload: bytes, signer: Signer | None = None) -> bytes:
    header = header.model_copy(update={"payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_len": len(payload), "signed": signer is not None})
    head = header.model_dump_json().encode()
    body = _PREFIX.pack(MAGIC, len(head)) + head + payload
    return body + signer.sign(body) if signer else body


def decode_envelope(data: bytes, verifier: Verifier | None = None) -> Envelope:
    """Validate every length before slicing; raise ProtocolError with the reason."""
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"envelope of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a fedge v1 envelope")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(data):
        raise ProtocolError(f"header length {head_len} exceeds the envelope ({len(data)} bytes) or the {MAX_HEADER_BYTES}-byte limit")
    head_end = _PREFIX.size + head_len
    try:
        # pydantic's own JSON parser: nesting is bounded (json.loads recursed until RecursionError).
        header = EnvelopeHeader.model_validate_json(data[_PREFIX.size : head_end])
    except ValidationError as exc:
        raise ProtocolError(f"invalid header: {first_error(exc)}") from None
    sig_len = SIGNATURE_BYTES if header.signed else 0
    if head_end + header.payload_len + sig_len != len(data):
        raise ProtocolError(f"payload length {header.payload_len} does not match the {len(data) - head_end - sig_len} bytes present")
    body_end = head_end + header.payload_len
    payload = data[head_end:body_end]
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise ProtocolError("payload SHA-256 does not match the header")
    if verifier is not None:
        if not header.signed:
            raise SignatureError(f"unsigned envelope from {header.sender!r}, but signatures are required")
        verifier.verify(header.sender, data[:body_end], data[body_end:])
    return Envelope(header=header, payload=payload)
