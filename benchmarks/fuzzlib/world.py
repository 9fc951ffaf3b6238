"""A federation without a broker, for the fuzz campaign: deterministic keys, a server and agents
whose message handlers are fed directly, and the genuine messages every mutation starts from."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compression import UpdateCodec
from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge import weights as W
from fedge.models import ModelConfig
from fedge.protocol import (
    ControlMessage,
    EnvelopeHeader,
    Reassembler,
    RoundAnnouncement,
    SnapshotAnnouncement,
    StatusMessage,
    Topics,
    TrainSettings,
    TransferInfo,
    encode_envelope,
    sign_record,
    split_chunks,
)
from fedge.protocol.signing import Signer
from fedge.rounds import Manifest
from fedge.transport import Message, publish_chunked
from fuzzlib.reproducers import Target as AttackTarget
from server.config import ServerConfig
from server.rounds import RoundServer, _Round

FED = "fuzz"
SITES = ("site-1", "site-2")
MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})
ISSUED = 1.9e9  # fixed timestamps keep every generated record byte-identical for a seed
FULL_CODEC = "fp32|zstd:1"  # what the server sends as a full global
MAX_MODEL_MB = 16  # the agents' cap on what a global's model config may build (the model here is ~4 KB)


def signer(name: str) -> Signer:
    """A key derived from its name: the same bytes every run, so signed cases reproduce."""
    return Signer(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"fedge-fuzz/{name}".encode()).digest()))


class NullSession:
    """Stands in for the MQTT session of a handler under test: publishes go nowhere."""

    def subscribe(self, *filters: str) -> None:
        """Nothing to subscribe to."""

    def unsubscribe(self, *filters: str) -> None:
        """Nothing to unsubscribe from."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 120.0) -> None:
        """Dropped."""

    def publish_chunked(self, topic_for: Callable[[int], str], data: bytes, *, chunk_size: int = 256 * 1024, retain: bool = False) -> TransferInfo:
        return publish_chunked(self, topic_for, data, chunk_size=chunk_size, retain=retain)


@dataclass(frozen=True)
class Downlink:
    """A global envelope and the announcement that names it."""

    envelope: bytes
    announcement: RoundAnnouncement


class World:
    """Keys under `folder`, a signed and an unsigned server (each with an open round 1), and
    agents built on demand; `signed` decides whether receivers hold keys."""

    def __init__(self, folder: Path, uplink_codec: str = "topk:0.1,ef|q8|zstd"):
        self.folder = folder
        self.topics = Topics(FED)
        trusted = folder / "trusted"
        trusted.mkdir(parents=True, exist_ok=True)
        self.signers = {name: signer(name) for name in ("server", *SITES)}
        self.signers["server"].save(folder / "server.key", folder / "server.pub")
        for site in SITES:
            self.signers[site].save(folder / f"{site}.key", trusted / f"{site}.pub")
        self.uplink_codec = uplink_codec
        self.servers = {signed: self._server(signed) for signed in (True, False)}
        server = self.servers[True]
        self.run_id = server.run_id
        self.weights = server.state.weights
        self.model_sha256 = W.state_sha256(self.weights)
        self.uplink_manifest = list(server.uplink_manifest)
        self.full_manifest = UpdateCodec.manifest(self.weights)
        self.full = self.downlink(1, UpdateCodec.from_spec(FULL_CODEC).encode(self.weights), FULL_CODEC, "full", signed=True)
        self.prepared = {signed: self._prepared_agent(signed) for signed in (True, False)}

    # ---- the server ------------------------------------------------------------------------------
    def _server(self, signed: bool) -> RoundServer:
        config = ServerConfig(
            federation=FED, broker="mqtt://127.0.0.1:1", model=MODEL, checkpoint_dir=self.folder / f"ckpt-{signed}",
            min_clients=1, uplink_codec=self.uplink_codec if signed else "fp32",
            trusted_keys=self.folder / "trusted" if signed else None, signing_key=self.folder / "server.key" if signed else None,
        )  # fmt: skip
        server = RoundServer(config)
        server.session = NullSession()
        return server

    def open_round(self, signed: bool) -> tuple[RoundServer, _Round]:
        """The server with a fresh round 1 open for both sites, as after its announcement."""
        server = self.servers[signed]
        current = _Round(1, SITES, time.time() + 3600, time.monotonic(), 0, self.model_sha256)
        server._set_open(current)
        server.reassembler = Reassembler(max_bytes=server.max_update_bytes, one_per_key=True)
        server.online.clear()
        server.uploads.clear()
        return server, current

    def update(self, site: str, signed: bool, payload: bytes | None = None, **header: object) -> bytes:
        """An update envelope from `site` for the open round 1: genuine, or around `payload`."""
        server = self.servers[signed]
        if payload is None:
            delta = self.weights_delta()
            payload = server.uplink.encode(delta, keep_dense=W.norm_stat_names(delta))
        fields = dict(kind="update", federation=FED, round=1, sender=site, codec=server.uplink.spec,
                      manifest_sha256=Manifest(tuple(self.uplink_manifest)).digest, num_samples=100, run=server.run_id,
                      model_sha256=self.model_sha256, nonce=hashlib.md5(site.encode()).hexdigest())  # fmt: skip
        return encode_envelope(EnvelopeHeader(**(fields | header)), payload, self.signers[site] if signed else None)

    def weights_delta(self) -> dict[str, np.ndarray]:
        """A small genuine downlink delta over the trainable tensors."""
        return {t.name: np.full(t.shape, 1e-3, np.float32) for t in self.uplink_manifest}

    def status(self, site: str, signed: bool, **fields: object) -> bytes:
        record = StatusMessage(federation=FED, sender=site, state="online", issued_at=ISSUED, **fields)
        return sign_record(record, self.signers[site] if signed else None)

    def attack_target(self, signed: bool) -> AttackTarget:
        """What an attacker knows of the open round 1, holding every key when `signed` (a key holder's mistake)."""
        server = self.servers[signed]
        return AttackTarget(
            federation=FED, run=server.run_id, round=1, model_sha256=self.model_sha256, uplink_codec=server.uplink.spec,
            uplink_manifest=tuple(self.uplink_manifest), model=json.loads(MODEL.to_json()),
            server=self.signers["server"] if signed else None, sites={site: self.signers[site] if signed else None for site in SITES},
        )  # fmt: skip

    # ---- the agent -------------------------------------------------------------------------------
    def agent(self, signed: bool, holding: bool = False) -> Agent:
        """A new agent (site-1) without a broker; `holding`: it already holds round 1's global.
        Training is replaced by a fixed envelope, so a case costs decoding, not an epoch."""
        folder = self.folder
        config = AgentConfig(broker="mqtt://127.0.0.1:1", site="site-1", federation=FED, state_dir=folder / f"agent-{signed}",
                             signing_key=folder / "site-1.key" if signed else None,
                             server_key=folder / "server.pub" if signed else None, max_model_mb=MAX_MODEL_MB)  # fmt: skip
        agent = Agent(config, task=None)
        agent.session = NullSession()
        agent._train = lambda ann: b"fuzz-update"  # type: ignore[method-assign]
        agent.state.remember_run = lambda *args: None  # type: ignore[method-assign]  # no case leaves its run to the next
        if holding:
            ready = self.prepared[signed]
            agent.held, agent.model, agent.mode = ready.held, ready.model, ready.mode
            agent.run_id, agent.run_issued = ready.run_id, ready.run_issued
        return agent

    def _prepared_agent(self, signed: bool) -> Agent:
        agent = self.agent(signed)
        for msg in self.downlink_messages(self.full, signed):
            agent._handle(msg)
        agent._progress()
        if agent.held is None or agent.held.sha256 != self.model_sha256:
            raise RuntimeError(f"the genuine round-1 global did not install: {list(agent.refusals.recent)}")
        return agent

    # ---- downlink messages -----------------------------------------------------------------------
    def announcement(self, rnd: int, envelope: bytes, kind: str, chunk_size: int = 256 * 1024, **fields: object) -> RoundAnnouncement:
        chunks = split_chunks(envelope, chunk_size, transfer=hashlib.sha256(envelope).digest()[:16])
        transfer = TransferInfo(transfer=chunks[0].transfer.hex(), chunks=len(chunks), bytes=len(envelope),
                                sha256=hashlib.sha256(envelope).hexdigest())  # fmt: skip
        base = dict(round=rnd, deadline=ISSUED + 3600, selected=SITES, model_sha256=self.model_sha256, downlink=transfer,
                    downlink_kind=kind, base_round=rnd - 1 if kind == "delta" else None, uplink_codec=self.servers[True].uplink.spec,
                    train=TrainSettings(), federation=FED, sender="server", run=self.run_id, issued_at=ISSUED)  # fmt: skip
        return RoundAnnouncement(**(base | fields))

    def global_envelope(self, rnd: int, payload: bytes, codec: str, manifest: tuple[dict, ...], base: int | None, signed: bool) -> bytes:
        header = EnvelopeHeader(kind="global", federation=FED, round=rnd, sender="server", codec=codec, manifest=manifest,
                                base_round=base, model=json.loads(MODEL.to_json()), run=self.run_id, nonce="0" * 32)  # fmt: skip
        return encode_envelope(header, payload, self.signers["server"] if signed else None)

    def downlink(self, rnd: int, payload: bytes, codec: str, kind: str, signed: bool) -> Downlink:
        manifest = W.manifest_entries(self.full_manifest if kind == "full" else self.uplink_manifest)
        envelope = self.global_envelope(rnd, payload, codec, manifest, rnd - 1 if kind == "delta" else None, signed)
        return Downlink(envelope, self.announcement(rnd, envelope, kind))

    def downlink_messages(self, down: Downlink, signed: bool, chunk_size: int = 256 * 1024) -> list[Message]:
        """The announcement (signed when `signed`), then the envelope's chunks, as the agent receives them."""
        ann = down.announcement
        chunks = split_chunks(down.envelope, chunk_size, transfer=bytes.fromhex(ann.downlink.transfer))
        messages = [Message(self.topics.announce(ann.round), sign_record(ann, self.signers["server"] if signed else None), True)]
        return messages + [Message(self.topics.global_chunk(ann.round, c.index), c.encode(), True) for c in chunks]

    def snapshot(self, envelope: bytes, signed: bool, chunk_size: int = 256 * 1024) -> list[Message]:
        """A snapshot pointer and chunks for `envelope`."""
        chunks = split_chunks(envelope, chunk_size, transfer=hashlib.sha256(envelope).digest()[:16])
        transfer = TransferInfo(transfer=chunks[0].transfer.hex(), chunks=len(chunks), bytes=len(envelope),
                                sha256=hashlib.sha256(envelope).hexdigest())  # fmt: skip
        pointer = SnapshotAnnouncement(round=0, model_sha256=self.model_sha256, transfer=transfer, federation=FED, sender="server",
                                       run=self.run_id, issued_at=ISSUED)  # fmt: skip
        messages = [Message(self.topics.snapshot, sign_record(pointer, self.signers["server"] if signed else None), True)]
        return messages + [Message(self.topics.snapshot_chunk(c.index), c.encode(), True) for c in chunks]

    def control(self, signed: bool) -> bytes:
        record = ControlMessage(command="finished", round=1, federation=FED, sender="server", run=self.run_id, issued_at=ISSUED)
        return sign_record(record, self.signers["server"] if signed else None)
