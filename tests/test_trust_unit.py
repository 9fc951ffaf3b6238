"""The attacks of issue 11 against the agent's and server's message handlers, without a broker.

Each test feeds what an attacker can publish on a shared broker straight into the handlers that
paho's messages reach, and checks it is refused, counted, and changes nothing.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from compression import UpdateCodec
from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge import weights as W
from fedge.models import ModelConfig
from fedge.protocol import (
    ControlMessage,
    EnvelopeHeader,
    ProtocolError,
    RoundAnnouncement,
    StatusMessage,
    Topics,
    TransferInfo,
    encode_envelope,
    open_record,
    sign_record,
    split_chunks,
)
from fedge.protocol.signing import SignatureError, Signer, Verifier
from fedge.rounds import Manifest
from fedge.transport import Message
from server.config import ServerConfig
from server.rounds import RoundServer, _Round

FED = "unit"
RUN = "a" * 32


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    trusted = folder / "trusted"
    trusted.mkdir()
    signers = {}
    for name in ("server", "site-1", "site-2"):
        signers[name] = Signer.generate()
        signers[name].save(folder / f"{name}.key", (trusted if name != "server" else folder) / f"{name}.pub")
    return folder, signers


def _announcement(rnd: int = 1, run: str = RUN, issued_at: float | None = None, **kw) -> RoundAnnouncement:
    transfer = TransferInfo(transfer="0" * 32, chunks=1, bytes=1, sha256="0" * 64)
    fields = dict(round=rnd, deadline=time.time() + 60, model_sha256="1" * 64, downlink=transfer, downlink_kind="full",
                  uplink_codec="fp32", federation=FED, sender="server", run=run)  # fmt: skip
    if issued_at is not None:
        fields["issued_at"] = issued_at
    return RoundAnnouncement(**(fields | kw))


def _signed_raw(record, signer: Signer, old: str, new: str) -> bytes:
    """A record edited past its schema (what pydantic would not build), then signed: the key holder's mistake."""
    import json

    body = record.model_dump_json().replace(old, new)
    assert body != record.model_dump_json()
    return json.dumps({"sender": record.sender, "body": body, "sig": signer.sign(body.encode()).hex()}).encode()


def _agent(tmp_path, keys) -> Agent:
    folder, _ = keys
    config = AgentConfig(broker="mqtt://127.0.0.1:1", site="site-1", federation=FED, state_dir=tmp_path / "agent",
                         signing_key=folder / "site-1.key", server_key=folder / "server.pub")  # fmt: skip
    return Agent(config, task=None)


# ---- signed records ---------------------------------------------------------------------------------------
def test_a_record_is_refused_unsigned_forged_from_another_federation_or_oversized(keys) -> None:
    _, signers = keys
    verifier = Verifier.from_pems({"server": signers["server"].public_pem()})
    ann = _announcement()
    assert open_record(sign_record(ann, signers["server"]), RoundAnnouncement, verifier, federation=FED, sender="server") == ann
    with pytest.raises(SignatureError, match="unsigned"):
        open_record(sign_record(ann, None), RoundAnnouncement, verifier, federation=FED, sender="server")
    with pytest.raises(SignatureError, match="bad signature"):
        open_record(sign_record(ann, Signer.generate()), RoundAnnouncement, verifier, federation=FED, sender="server")
    with pytest.raises(ProtocolError, match="federation"):
        open_record(sign_record(ann, signers["server"]), RoundAnnouncement, verifier, federation="other", sender="server")
    with pytest.raises(ProtocolError, match="limit"):
        open_record(b"{" * 200_000, RoundAnnouncement, None, federation=FED)
    # A body changed after signing no longer verifies.
    raw = sign_record(ann, signers["server"]).replace(b'\\"round\\":1', b'\\"round\\":2')
    with pytest.raises(SignatureError):
        open_record(raw, RoundAnnouncement, verifier, federation=FED, sender="server")


@pytest.mark.parametrize(
    "raw", [b"1", b"[]", b"null", b'{"command": "finished"}', b"[" * 5000, b"\xff\xfe", b'{"sender":"server","body":"' + b"[" * 5000 + b'"}']
)
def test_hostile_json_is_a_protocol_error_not_a_crash(raw) -> None:
    with pytest.raises(ProtocolError):
        open_record(raw, ControlMessage, None, federation=FED)


def test_a_deeply_nested_envelope_header_is_refused_without_recursion() -> None:
    head = b"[" * 100_000
    with pytest.raises(ProtocolError, match="invalid header"):
        from fedge.protocol import decode_envelope

        decode_envelope(b"FDG1" + len(head).to_bytes(4, "big") + head)


# ---- the agent ----------------------------------------------------------------------------------------------
def test_agent_refuses_forged_control_and_announcements_and_keeps_running(tmp_path, keys) -> None:
    _, signers = keys
    agent = _agent(tmp_path, keys)
    topics = Topics(FED)
    forged = {
        "retained 1 on control": (topics.control, b"1"),
        "unsigned finished": (topics.control, b'{"command": "finished"}'),
        "finished signed by a stranger": (
            topics.control,
            sign_record(ControlMessage(command="finished", round=1, federation=FED, sender="server", run=RUN), Signer.generate()),
        ),
        "unsigned round 999999999": (topics.announce(999999999), sign_record(_announcement(999999999), None)),
        "round 999999999 signed by a stranger": (topics.announce(999999999), sign_record(_announcement(999999999), Signer.generate())),
        "announcement of round 1 on round 2's topic": (topics.announce(2), sign_record(_announcement(1), signers["server"])),
        "a million epochs, signed": (topics.announce(3), _signed_raw(_announcement(3), signers["server"], '"epochs":1,', '"epochs":1000000,')),
        "an optimizer nobody implemented, signed": (
            topics.announce(4),
            _signed_raw(_announcement(4), signers["server"], '"epochs":1,', '"epochs":1,"optimizer":"rmsprop",'),
        ),
        "garbage global chunk": (topics.global_chunk(1, 0), b"\x00" * 40),
    }
    for topic, payload in forged.values():
        agent._handle(Message(topic, payload, retain=True))
    assert not agent.finished and agent.pending is None and agent.run_id is None
    assert agent.refusals.total == len(forged)
    assert agent.refusals.counts["bad-signature"] == 3 and agent.refusals.counts["bad-record"] == 5
    assert agent.refusals.counts["handler-error"] == 0

    genuine = _announcement(1)
    agent._handle(Message(topics.announce(1), sign_record(genuine, signers["server"]), retain=True))
    assert agent.pending == genuine and agent.run_id == RUN


def test_agent_refuses_an_older_runs_records_and_follows_a_newer_run(tmp_path, keys) -> None:
    _, signers = keys
    agent = _agent(tmp_path, keys)
    topics = Topics(FED)
    now = time.time()
    agent._handle(Message(topics.announce(2), sign_record(_announcement(2, issued_at=now), signers["server"]), retain=True))
    old_run = "b" * 32
    replayed = [
        (topics.announce(5), sign_record(_announcement(5, run=old_run, issued_at=now - 3600), signers["server"])),
        (
            topics.control,
            sign_record(ControlMessage(command="finished", round=5, federation=FED, sender="server", run=old_run, issued_at=now - 3500), signers["server"]),
        ),
    ]
    for topic, payload in replayed:
        agent._handle(Message(topic, payload, retain=True))
    assert agent.pending.round == 2 and agent.run_id == RUN and not agent.finished
    assert agent.refusals.counts["wrong-run"] == 2

    new_run = "c" * 32
    agent._handle(Message(topics.announce(1), sign_record(_announcement(1, run=new_run, issued_at=now + 10), signers["server"]), retain=True))
    assert agent.run_id == new_run and agent.pending.round == 1
    agent._handle(
        Message(
            topics.control,
            sign_record(ControlMessage(command="finished", round=1, federation=FED, sender="server", run=new_run), signers["server"]),
            retain=True,
        )
    )
    assert agent.finished


def test_agent_refuses_a_global_whose_bytes_the_signed_announcement_does_not_name(tmp_path, keys) -> None:
    _, signers = keys
    agent = _agent(tmp_path, keys)
    topics = Topics(FED)
    weights = {"w": np.ones((2, 2), np.float32)}
    codec = UpdateCodec.from_spec("fp32")
    header = EnvelopeHeader(kind="global", federation=FED, round=1, sender="server", codec="fp32",
                            manifest=Manifest.of(weights).entries(), model={"arch": "cnn"}, run=RUN)  # fmt: skip
    envelope = encode_envelope(header, codec.encode(weights), signers["server"])
    chunks = split_chunks(envelope)
    # Signed by the server and intact, but announced with another digest (e.g. a global replayed from another round).
    transfer = TransferInfo(transfer=chunks[0].transfer.hex(), chunks=1, bytes=len(envelope), sha256="2" * 64)
    ann = _announcement(1, downlink=transfer, model_sha256=W.state_sha256(weights))
    agent._handle(Message(topics.announce(1), sign_record(ann, signers["server"]), retain=True))
    agent._handle(Message(topics.global_chunk(1, 0), chunks[0].encode(), retain=True))
    agent.session = None
    agent.want_snapshot = True  # no broker here: _start_snapshot would subscribe
    assert not agent._try_obtain(ann)
    assert agent.held is None
    assert "SHA-256 of the signed announcement" in agent.refusals.recent[-1][1]
    # A chunk of a transfer the announcement does not name is dropped before reassembly.
    other = split_chunks(envelope)[0]
    agent._handle(Message(topics.global_chunk(1, 0), other.encode(), retain=True))
    assert agent.refusals.recent[-1][0] == "bad-chunk" and agent.reassembler.open_transfers == 0
    assert hashlib.sha256(envelope).hexdigest() != transfer.sha256


def test_late_chunks_of_a_re_announced_rounds_first_transfer_are_dropped_but_not_refused(tmp_path, keys) -> None:
    _, signers = keys
    agent = _agent(tmp_path, keys)
    topics = Topics(FED)
    first, second, stranger = (split_chunks(b"x" * 10)[0] for _ in range(3))
    for chunk in (first, second):  # the round re-announced at its deadline publishes its global again, as a new transfer
        transfer = TransferInfo(transfer=chunk.transfer.hex(), chunks=1, bytes=10, sha256="0" * 64)
        agent._handle(Message(topics.announce(1), sign_record(_announcement(1, downlink=transfer), signers["server"]), retain=True))
    assert agent.pending is not None and agent.pending.downlink.transfer == second.transfer.hex()
    agent._handle(Message(topics.global_chunk(1, 0), first.encode(), retain=True))  # late, from the first publication
    assert agent.refusals.total == 0 and agent.reassembler.open_transfers == 0
    agent._handle(Message(topics.global_chunk(1, 0), stranger.encode(), retain=True))
    assert agent.refusals.counts == {"bad-chunk": 1} and agent.reassembler.open_transfers == 0


# ---- the server ---------------------------------------------------------------------------------------------
def _server(tmp_path, keys=None, **kw) -> RoundServer:
    config = ServerConfig(
        federation=FED, broker="mqtt://127.0.0.1:1", checkpoint_dir=tmp_path / "ckpt", min_clients=1,
        model=ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]}),
        trusted_keys=keys[0] / "trusted" if keys else None, **kw,
    )  # fmt: skip
    return RoundServer(config)


def _open_round(server: RoundServer, selected=("site-1", "site-2")) -> _Round:
    current = _Round(1, tuple(selected), time.time() + 60, time.monotonic(), 0, W.state_sha256(server.state.weights))
    server._set_open(current)
    return current


def _update(server: RoundServer, current: _Round, site: str, scale: float = 1e-3, signer: Signer | None = None, **header) -> bytes:
    delta = {t.name: np.full(t.shape, scale, np.float32) for t in server.uplink_manifest}
    fields = dict(kind="update", federation=FED, round=current.number, sender=site, codec=server.uplink.spec,
                  manifest_sha256=server.uplink_manifest.digest, num_samples=100, run=server.run_id,
                  model_sha256=current.model_sha256)  # fmt: skip
    return encode_envelope(EnvelopeHeader(**(fields | header)), server.uplink.encode(delta), signer)


def _send(server: RoundServer, current: _Round, site: str, envelope: bytes) -> None:
    for chunk in split_chunks(envelope, 64 * 1024):
        topic = server.topics.update_chunk(current.number, site, chunk.index)
        if server._accept(topic) is None:
            server._handle(Message(topic, chunk.encode(), retain=False), current)
        else:
            server.refusals("unexpected-topic", topic)


def test_a_forged_huge_update_is_refused_and_the_genuine_one_still_counts(tmp_path) -> None:
    """Finding 2 without signatures: 3e38 values and 1e9 samples from a selected site's name."""
    server = _server(tmp_path)
    current = _open_round(server)
    _send(server, current, "site-1", _update(server, current, "site-1", scale=3e38, num_samples=10**9))
    _send(server, current, "site-1", _update(server, current, "site-1", scale=3e38))
    assert server.refusals.counts["sample-count"] == 1 and server.refusals.counts["norm-bound"] == 1
    assert "site-1" not in current.updates
    _send(server, current, "site-1", _update(server, current, "site-1"))
    _send(server, current, "site-2", _update(server, current, "site-2"))
    assert sorted(current.updates) == ["site-1", "site-2"]


def test_a_non_finite_aggregate_is_never_applied(tmp_path) -> None:
    """Finite updates whose weighted sum overflows float32: the round is re-run without the largest."""
    server = _server(tmp_path, max_update_norm=float("inf"))
    current = _open_round(server, ("site-1", "site-2"))
    _send(server, current, "site-1", _update(server, current, "site-1", scale=3.4e38, num_samples=2))
    assert server._aggregate(current) is None  # nothing finite is left: the round keeps collecting
    assert current.excluded == {"site-1"} and server.refusals.counts["non-finite-aggregate"] == 1
    assert server._accept(server.topics.update_chunk(1, "site-1", 0)) is not None  # its resend is not read again

    server = _server(tmp_path / "b", max_update_norm=float("inf"))
    current = _open_round(server, ("site-1", "site-2", "site-3"))
    for site, scale in (("site-1", 3e38), ("site-2", 3.2e38), ("site-3", 1e-3)):
        _send(server, current, site, _update(server, current, site, scale=scale, num_samples=1))
    mean = server._aggregate(current)
    assert sorted(current.updates) == ["site-1", "site-3"] and current.excluded == {"site-2"}
    assert all(np.isfinite(v).all() for v in mean.values())


def test_replayed_updates_are_refused_and_the_genuine_update_is_not_pushed_out(tmp_path, keys) -> None:
    """Finding 4: an update signed in an earlier run, or for another model, or sent twice."""
    _, signers = keys
    server = _server(tmp_path, keys)
    current = _open_round(server)
    earlier_run = _update(server, current, "site-1", signer=signers["site-1"], run="d" * 32)
    other_model = _update(server, current, "site-1", signer=signers["site-1"], model_sha256="e" * 64)
    no_run = _update(server, current, "site-1", signer=signers["site-1"], run=None)
    for envelope in (earlier_run, other_model, no_run):
        _send(server, current, "site-1", envelope)
    assert server.refusals.counts["wrong-run"] == 2 and server.refusals.counts["wrong-base"] == 1
    genuine = _update(server, current, "site-1", signer=signers["site-1"])
    _send(server, current, "site-1", genuine)
    assert "site-1" in current.updates
    _send(server, current, "site-1", genuine)  # a replay of the accepted one is dropped by topic, unread
    assert server.refusals.counts["unexpected-topic"] >= 1
    unsigned = _update(server, current, "site-2")
    _send(server, current, "site-2", unsigned)
    assert server.refusals.counts["bad-signature"] == 1 and "site-2" not in current.updates


def test_a_repeated_nonce_is_a_replay(tmp_path) -> None:
    server = _server(tmp_path)
    current = _open_round(server)
    first = _update(server, current, "site-1", nonce="f" * 32)
    _send(server, current, "site-1", first)
    del current.updates["site-1"]  # as if it had been excluded from the aggregate and the site sent it again
    server._set_open(current)
    _send(server, current, "site-1", first)
    assert server.refusals.counts["replay"] == 1


def test_floods_are_dropped_before_reassembly_and_one_site_holds_one_bounded_transfer(tmp_path) -> None:
    """Finding 3: chunks for names nobody selected are dropped by topic; a selected name holds at most
    one open transfer, never larger than an update of this model can be; a nested header is refused."""
    server = _server(tmp_path)
    current = _open_round(server)
    junk = b"\x00" * (64 * 1024)
    for i in range(12):
        topic = server.topics.update_chunk(1, f"fake-{i}", 0)
        assert "no update expected" in server._accept(topic)
    assert "not open" in server._accept(server.topics.update_chunk(7, "site-1", 0))
    for _ in range(20):  # twenty transfers in a row under site-1's name: one stays open
        chunk = split_chunks(junk * 4, 64 * 1024)[0]
        server._handle(Message(server.topics.update_chunk(1, "site-1", 0), chunk.encode(), False), current)
    assert server.reassembler.open_transfers == 1 and server.reassembler.open_bytes == len(junk)
    huge = split_chunks(b"x" * (server.max_update_bytes + 1), 1 << 20)[0]
    server._handle(Message(server.topics.update_chunk(1, "site-2", 0), huge.encode(), False), current)
    assert "over the" in server.rejections[-1][2]
    head = b"[" * 200_000
    _send(server, current, "site-2", b"FDG1" + len(head).to_bytes(4, "big") + head)
    assert server.refusals.counts["bad-envelope"] == 1 and server.refusals.counts["handler-error"] == 0


def test_status_from_strangers_and_unsigned_status_do_not_count_a_site_online(tmp_path, keys) -> None:
    _, signers = keys
    server = _server(tmp_path, keys)
    topics = server.topics
    for site, signer in (("site-1", None), ("site-1", Signer.generate()), ("mallory", signers["site-1"])):
        server._handle(Message(topics.status(site), sign_record(StatusMessage(federation=FED, sender=site, state="online"), signer), True), None)
    assert server.online == set() and server.refusals.counts["bad-signature"] == 3
    server._handle(Message(topics.status("site-1"), sign_record(StatusMessage(federation=FED, sender="site-1", state="online"), signers["site-1"]), True), None)
    assert server.online == {"site-1"}


def test_the_run_id_survives_a_restart_and_a_new_folder_gets_a_new_one(tmp_path) -> None:
    first = _server(tmp_path).run_id
    assert _server(tmp_path).run_id == first
    assert _server(tmp_path / "other").run_id != first


def test_a_sample_count_registered_at_provisioning_binds_that_site(tmp_path) -> None:
    server = _server(tmp_path, site_max_samples={"site-1": 500})
    current = _open_round(server)
    _send(server, current, "site-1", _update(server, current, "site-1", num_samples=501))
    _send(server, current, "site-2", _update(server, current, "site-2", num_samples=501))
    assert server.refusals.counts["sample-count"] == 1 and sorted(current.updates) == ["site-2"]


def test_a_restarted_agent_still_knows_its_run_and_refuses_an_older_runs_finished(tmp_path, keys) -> None:
    _, signers = keys
    topics = Topics(FED)
    now = time.time()
    agent = _agent(tmp_path, keys)
    agent._handle(Message(topics.announce(3), sign_record(_announcement(3, issued_at=now), signers["server"]), retain=True))
    restarted = _agent(tmp_path, keys)  # same state folder: nothing of the run is in memory any more
    assert restarted.run_id == RUN
    old_run = "b" * 32
    restarted._handle(Message(topics.announce(9), sign_record(_announcement(9, run=old_run, issued_at=now - 60), signers["server"]), retain=True))
    restarted._handle(Message(topics.control, sign_record(ControlMessage(command="finished", round=9, federation=FED, sender="server",
                                                                        run=old_run, issued_at=now - 50), signers["server"]), retain=True))  # fmt: skip
    assert not restarted.finished and restarted.pending is None and restarted.refusals.counts["wrong-run"] == 2
