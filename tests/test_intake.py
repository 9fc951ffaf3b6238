"""The server's update intake (server.intake): decoding in worker processes changes neither what is
counted nor the aggregate, whatever order updates arrive and finish in; refusals are counted as
inline; and a full intake stops the round loop taking messages."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_trust_unit import _open_round, _send, _server, _update

from fedge.memory_transport import MemoryBroker
from fedge.protocol.signing import Signer
from server.intake import UpdateIntake
from server.rounds import RoundServer, _Round

SITES = tuple(f"site-{i}" for i in range(1, 7))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    (folder / "trusted").mkdir()
    signers = {site: Signer.generate() for site in SITES}
    for site, signer in signers.items():
        signer.save(folder / f"{site}.key", folder / "trusted" / f"{site}.pub")
    return folder, signers


def _round_of(server: RoundServer, keys, order: tuple[str, ...]) -> tuple[_Round, dict[str, np.ndarray]]:
    """Hostile inputs, then every site's genuine update in `order`; the counted round and its aggregate."""
    _, signers = keys
    current = _open_round(server, SITES)
    _send(server, current, "site-1", _update(server, current, "site-1", signer=signers["site-2"]))  # forged: another site's key
    _send(server, current, "site-2", _update(server, current, "site-2", signer=signers["site-2"], run="d" * 32))  # another run
    _send(server, current, "site-3", _update(server, current, "site-3", signer=signers["site-3"], scale=1e6))  # norm bound
    _send(server, current, "site-4", b"FDG1 not an envelope")
    deadline = time.monotonic() + 60
    while current.decoding:  # the refusals come back; each site may send again
        assert time.monotonic() < deadline, "the pool did not finish"
        server._take(current, timeout=0.1)
    for i, site in enumerate(order):
        rng = np.random.default_rng(SITES.index(site))
        scale = float(rng.uniform(1e-4, 1e-2))
        _send(server, current, site, _update(server, current, site, signer=signers[site], scale=scale, nonce=f"{i:032x}"[:32],
                                             num_samples=10 + SITES.index(site)))  # fmt: skip
    while current.decoding:
        assert time.monotonic() < deadline, "the pool did not finish"
        server._take(current, timeout=0.1)
    mean = server._aggregate(current)
    assert mean is not None
    return current, mean


@pytest.mark.integration  # starts a pool of decoder processes
def test_decoding_in_worker_processes_counts_the_same_and_aggregates_the_same_in_any_order(tmp_path, keys) -> None:
    inline = _server(tmp_path / "inline", keys)
    pooled = _server(tmp_path / "pooled", keys, decode_workers=2)
    try:
        counted_inline, mean_inline = _round_of(inline, keys, SITES)
        counted_pooled, mean_pooled = _round_of(pooled, keys, tuple(reversed(SITES)))
    finally:
        pooled.intake.close()
    assert sorted(counted_pooled.updates) == sorted(counted_inline.updates) == list(SITES)
    for kind in ("bad-signature", "wrong-run", "norm-bound", "bad-envelope"):
        assert pooled.refusals.counts[kind] == inline.refusals.counts[kind] == 1, kind
    assert pooled.refusals.total == inline.refusals.total == 4
    assert mean_inline.keys() == mean_pooled.keys()
    assert all(np.array_equal(mean_inline[k], mean_pooled[k]) for k in mean_inline)  # bit for bit


@pytest.mark.integration  # starts a decoder process
def test_a_full_intake_takes_no_message_until_a_decode_finishes(tmp_path, keys) -> None:
    server = _server(tmp_path, keys, decode_workers=1)
    broker = MemoryBroker()
    server.session = broker.session("server")
    server.session.subscribe(server.topics.all_updates)
    server.session.connect()
    current = _open_round(server, SITES)
    expected = server._expected(current, "site-1")
    sender = broker.session("site-6")
    sender.connect()
    try:
        assert server.intake.max_pending == 4
        for site in SITES[:4]:  # four envelopes in flight fill a one-worker intake
            server.intake.submit(_update(server, current, site, signer=keys[1][site]), 1, site, expected)
            current.decoding.add(site)
        assert server.intake.full
        sender.publish(server.topics.update_chunk(1, "site-6", 0), b"not a chunk: refused once it is read")
        server._pump(0.0, current)  # full: takes finished decodes, reads no message
        assert server.refusals.counts["bad-chunk"] == 0
        deadline = time.monotonic() + 60
        while current.decoding or not server.refusals.counts["bad-chunk"]:
            assert time.monotonic() < deadline, "the pool did not finish"
            server._pump(0.1, current)
        assert sorted(current.updates) == list(SITES[:4]) and server.refusals.counts["bad-chunk"] == 1
    finally:
        server.intake.close()


def test_intake_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="decode workers"):
        UpdateIntake(-1, verifier=None, trusted_keys=None, max_norm=1.0)
