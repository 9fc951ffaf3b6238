"""fedge.rounds: the one implementation of what travels in a round, used by agent, server and bench."""

from __future__ import annotations

import numpy as np
import pytest

from compression import ErrorFeedback
from fedge.models import ModelConfig
from fedge.protocol import ProtocolError
from fedge.protocol.signing import Signer, Verifier
from fedge.rounds import Expected, Manifest, RejectedUpdate, make_global, make_update, read_global, read_update

CONFIG = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28)
RUN = "a" * 32
RNG = np.random.default_rng(0)
DELTA = {
    "conv.weight": RNG.normal(0, 1e-2, (8, 1, 3, 3)).astype(np.float32),
    "bn.running_var": np.abs(RNG.normal(1, 0.1, 8)).astype(np.float32),
    "head.weight": RNG.normal(0, 1e-2, (2, 8)).astype(np.float32),
}


def test_manifest_wire_form_and_digest_round_trip() -> None:
    manifest = Manifest.of(DELTA)
    from fedge.protocol import EnvelopeHeader

    header = EnvelopeHeader(kind="global", federation="f", round=1, sender="server", codec="fp32", manifest=manifest.entries())
    assert Manifest.from_entries(header.manifest).digest == manifest.digest
    assert manifest.only({"head.weight"}).specs == (manifest.specs[2],) and manifest.numel == 72 + 8 + 16
    assert Manifest.of({"head.weight": DELTA["head.weight"]}).digest != manifest.digest


@pytest.mark.parametrize("codec", ["fp32|zstd:1", "q8,ef|zstd", "topk:0.2,ef|ternary|zstd", "q4", "fp16"])
def test_a_global_keeps_exactly_what_its_receivers_decode(codec: str) -> None:
    signer = Signer.generate()
    residual = ErrorFeedback()
    envelope, kept = make_global(DELTA, config=CONFIG, federation="f", run=RUN, round=3, sender="server", codec=codec,
                                 base_round=2, residual=residual, signer=signer)  # fmt: skip
    import hashlib

    verifier = Verifier.from_pems({"server": signer.public_pem()})
    sha = hashlib.sha256(envelope).hexdigest()
    ours = lambda header, config: Manifest.of(DELTA)  # noqa: E731  (what the receiver's model holds)
    glob = read_global(envelope, sha256=sha, federation="f", run=RUN, verifier=verifier, expect=ours)
    assert glob.is_delta and glob.config == CONFIG
    for name, value in kept.items():
        np.testing.assert_array_equal(glob.tensors[name], value, err_msg=f"{codec} {name}")
    with pytest.raises(ProtocolError, match="SHA-256"):
        read_global(envelope, sha256="0" * 64, federation="f", run=RUN, verifier=verifier, expect=ours)
    with pytest.raises(ProtocolError, match="run"):
        read_global(envelope, sha256=sha, federation="f", run="b" * 32, verifier=verifier, expect=ours)
    with pytest.raises(ProtocolError, match="manifest"):  # another model's tensors are refused before decoding
        read_global(envelope, sha256=sha, federation="f", run=RUN, verifier=verifier, expect=lambda h, c: Manifest.of({"w": np.zeros(4, np.float32)}))


def test_an_update_is_read_only_in_the_round_run_and_model_it_was_made_for() -> None:
    signer = Signer.generate()
    verifier = Verifier.from_pems({"site-1": signer.public_pem()})
    manifest = Manifest.of(DELTA)
    expected = Expected(federation="f", run=RUN, round=2, model_sha256="1" * 64, selected=("site-1",), codec="topk:0.5|q8|zstd",
                        manifest=manifest, max_samples=1000)  # fmt: skip

    def update(**kw) -> bytes:
        fields = dict(codec="topk:0.5|q8|zstd", federation="f", site="site-1", round=2, run=RUN, model_sha256="1" * 64,
                      num_samples=10, metrics={"train_loss": 0.5}, signer=signer)  # fmt: skip
        return make_update(DELTA, **(fields | kw))

    got = read_update(update(), topic_client="site-1", expected=expected, verifier=verifier)
    assert got.header.num_samples == 10 and set(got.delta) == set(DELTA)
    for kind, kw in {
        "wrong-run": {"run": "b" * 32}, "stale": {"round": 1}, "wrong-base": {"model_sha256": "2" * 64},
        "wrong-codec": {"codec": "q8|zstd"}, "sample-count": {"num_samples": 1001},
    }.items():  # fmt: skip
        with pytest.raises(RejectedUpdate) as info:
            read_update(update(**kw), topic_client="site-1", expected=expected, verifier=verifier)
        assert info.value.kind == kind
    with pytest.raises(RejectedUpdate, match="does not match topic client"):
        read_update(update(), topic_client="site-2", expected=expected, verifier=verifier)
