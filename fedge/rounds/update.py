"""A site's update on the wire: made by the agent (and `fedge bench`), read and checked by the server.

The checks every update passes before it counts live here, beside the code that makes one, so the
two cannot drift; the server adds its own policy after decoding (norm bound, nonce, strategy)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from compression import ErrorFeedback, SparseTensor
from fedge.protocol import EnvelopeHeader, decode_envelope, encode_envelope
from fedge.protocol.signing import Signer, Verifier
from fedge.rounds.codecs import codec_for
from fedge.rounds.manifest import Manifest


class RejectedUpdate(Exception):
    """An update that does not count: `kind` is counted, `reason` logged."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Expected:
    """What the open round accepts: the server's run, the round, its announced global, its codec."""

    federation: str
    run: str
    round: int
    model_sha256: str
    selected: Collection[str]
    codec: str
    manifest: Manifest
    max_samples: int
    head_stats: bool = False  # a head-calibration round: feature statistics (fedge.tasks.calibration), not a delta


@dataclass(frozen=True)
class Update:
    header: EnvelopeHeader
    delta: dict[str, np.ndarray | SparseTensor]
    nbytes: int


def make_update(
    delta: Mapping[str, np.ndarray],
    *,
    codec: str,
    federation: str,
    site: str,
    round: int,
    run: str | None,
    model_sha256: str | None,
    num_samples: int,
    metrics: Mapping[str, float],
    residual: ErrorFeedback | None = None,
    seed: int = 0,
    signer: Signer | None = None,
) -> bytes:
    """The signed envelope of `delta` (BatchNorm statistics dense, as every codec keeps them)."""
    from fedge.weights import norm_stat_names

    spec = codec_for(codec)
    payload = spec.encode(delta, residual=residual, keep_dense=norm_stat_names(delta), seed=seed)
    header = EnvelopeHeader(
        kind="update", federation=federation, round=round, sender=site, codec=spec.spec, manifest_sha256=Manifest.of(delta).digest,
        num_samples=num_samples, metrics=dict(metrics), run=run, model_sha256=model_sha256,
    )  # fmt: skip
    return encode_envelope(header, payload, signer)


def validate_header(header: EnvelopeHeader, *, topic_client: str, expected: Expected) -> None:
    if header.kind != "update":
        raise RejectedUpdate("bad-envelope", f"envelope kind {header.kind!r} on an update topic")
    if header.federation != expected.federation:
        raise RejectedUpdate("wrong-federation", f"wrong federation {header.federation!r}")
    if header.sender != topic_client:
        raise RejectedUpdate("wrong-sender", f"sender {header.sender!r} does not match topic client {topic_client!r}")
    if header.run != expected.run:
        raise RejectedUpdate("wrong-run", f"update for run {header.run!r}, this server runs {expected.run!r} (a replay from another run?)")
    if header.round != expected.round:
        kind = "stale" if header.round < expected.round else "future"
        raise RejectedUpdate(kind, f"{kind} round {header.round} (current {expected.round})")
    if header.model_sha256 != expected.model_sha256:
        raise RejectedUpdate("wrong-base", "update was not trained from this round's announced global model")
    if expected.selected and header.sender not in expected.selected:
        raise RejectedUpdate("not-selected", f"client {header.sender!r} was not selected for round {expected.round}")
    if header.codec != expected.codec:
        raise RejectedUpdate("wrong-codec", f"codec {header.codec!r} differs from the announced {expected.codec!r}")
    if not 1 <= header.num_samples <= expected.max_samples:
        raise RejectedUpdate("sample-count", f"sample count {header.num_samples} outside [1, {expected.max_samples}] (--max-samples)")
    if header.manifest:
        if len(header.manifest) != len(expected.manifest) or not Manifest.from_entries(header.manifest).same_shapes(expected.manifest):
            raise RejectedUpdate("wrong-manifest", "tensor manifest does not match the global model")
    elif header.manifest_sha256 != expected.manifest.digest:
        raise RejectedUpdate("wrong-manifest", "tensor manifest digest missing or does not match the global model")


def read_update(data: bytes, *, topic_client: str, expected: Expected, verifier: Verifier | None) -> Update:
    """Envelope (lengths, header, hash, signature), then every check above, then the payload.
    Raises ProtocolError (SignatureError), RejectedUpdate or CodecError with the reason."""
    env = decode_envelope(data, verifier)
    validate_header(env.header, topic_client=topic_client, expected=expected)
    from fedge.weights import norm_stat_names

    # The server holds the manifest; only BatchNorm statistics travel dense beside a sparsifier or
    # lossy coder (make_update), so each tensor's kind and the zstd frame are bounded per tensor.
    kept = norm_stat_names(dict.fromkeys(t.name for t in expected.manifest))
    delta = codec_for(expected.codec).decode(env.payload, list(expected.manifest.specs), keep_dense=kept)
    return Update(env.header, delta, len(data))
