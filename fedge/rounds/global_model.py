"""The global model on the wire: made by the server (a full model, or a delta from the previous
round with a downlink codec) and by `fedge bench`; read by the agent against what a signed record
announced."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from compression import ErrorFeedback
from fedge.models import ModelConfig
from fedge.protocol import (
    EnvelopeHeader,
    ProtocolError,
    decode_envelope,
    encode_envelope,
)
from fedge.protocol.signing import Signer, Verifier
from fedge.rounds.codecs import FULL_MODEL_CODEC, codec_for
from fedge.rounds.manifest import Manifest


@dataclass(frozen=True)
class GlobalPayload:
    """A decoded global envelope: the model config, and either the whole model or a delta from `base_round`."""

    header: EnvelopeHeader
    config: ModelConfig
    tensors: dict[str, np.ndarray]  # dense float32

    @property
    def is_delta(self) -> bool:
        return self.header.base_round is not None


def make_global(
    tensors: Mapping[str, np.ndarray],
    *,
    config: ModelConfig,
    federation: str,
    run: str | None,
    round: int,
    sender: str,
    codec: str = FULL_MODEL_CODEC,
    base_round: int | None = None,
    residual: ErrorFeedback | None = None,
    signer: Signer | None = None,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The signed envelope of a whole model (`base_round` None) or of a delta from `base_round`, and
    what receivers will decode from it (for a lossy delta codec, not `tensors` itself)."""
    from fedge.weights import norm_stat_names

    spec = codec_for(codec)
    payload, received = spec.encode_reconstructed(tensors, residual=residual, keep_dense=norm_stat_names(tensors) if base_round is not None else ())
    header = EnvelopeHeader(
        kind="global", federation=federation, round=round, sender=sender, codec=spec.spec, manifest=Manifest.of(tensors).entries(),
        base_round=base_round, model=json.loads(config.to_json()), run=run,
    )  # fmt: skip
    return encode_envelope(header, payload, signer), received


def read_global(
    data: bytes,
    *,
    sha256: str,
    federation: str,
    run: str | None,
    verifier: Verifier | None,
    expect: Callable[[EnvelopeHeader, ModelConfig], Manifest],
) -> GlobalPayload:
    """`sha256` comes from the signed record that announced these bytes: checked before parsing.
    `expect` names the tensors the receiver holds for this header and model config (its model in
    the announced mode; for a delta, the tensors that travel): the manifest must be exactly that
    before a byte is decoded, so decoding and densifying allocate no more than that model.
    ProtocolError, CodecError or ValueError (model config) with the reason."""
    from fedge.weights import densify, norm_stat_names

    if hashlib.sha256(data).hexdigest() != sha256:
        raise ProtocolError("downlink bytes do not match the SHA-256 of the signed announcement")
    env = decode_envelope(data, verifier)
    if env.header.kind != "global" or env.header.model is None:
        raise ProtocolError("downlink envelope is not a global model")
    if env.header.federation != federation or env.header.run != run:
        raise ProtocolError(f"global of federation {env.header.federation!r} run {env.header.run!r}, not {federation!r} run {run!r}")
    config = ModelConfig.from_json(json.dumps(env.header.model))
    expected = expect(env.header, config)
    entries = env.header.manifest  # counted first: 40,000 entries need not become TensorSpecs to be refused
    if len(entries) != len(expected) or not Manifest.from_entries(entries).same_shapes(expected):
        raise ProtocolError("the global's manifest is not the model its config builds in the announced mode")
    kept = norm_stat_names(dict.fromkeys(t.name for t in expected)) if env.header.base_round is not None else ()
    decoded = codec_for(env.header.codec).decode(env.payload, list(expected.specs), max_output_bytes=4 * expected.numel, keep_dense=kept)
    return GlobalPayload(env.header, config, densify(decoded))
