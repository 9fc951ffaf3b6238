"""The edge agent's session loop: receive the global model, train on local data, send a compressed delta."""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from compression import CodecError, UpdateCodec
from edge_client.config import AgentConfig
from edge_client.state import AgentState
from fedge import weights as W
from fedge.models import ModelConfig, build_model
from fedge.modes import TrainingMode, get_mode
from fedge.protocol import (
    Chunk,
    EnvelopeHeader,
    ProtocolError,
    Reassembler,
    RoundAnnouncement,
    SnapshotAnnouncement,
    StatusMessage,
    Topics,
    decode_envelope,
    encode_envelope,
)
from fedge.protocol.signing import Signer, Verifier
from fedge.tasks import ClassificationTask, default_device
from fedge.transport import Message, MqttSession

log = logging.getLogger("fedge.agent")


def train_seed(seed: int, site: str, rnd: int) -> int:
    """The seed of a site's local training (and codec rounding) in round `rnd`: distinct per site and round."""
    return zlib.crc32(f"{seed}/{site}/{rnd}".encode())


@dataclass
class _Global:
    """The model an agent holds: the global after round `round`."""

    round: int
    config: ModelConfig
    weights: dict[str, np.ndarray]
    sha256: str


class Agent:
    def __init__(self, config: AgentConfig, task: ClassificationTask, indices: np.ndarray | None = None):
        self.config = config
        self.task = task
        self.indices = indices
        self.topics = Topics(config.federation)
        self.state = AgentState(config.state_dir)
        self.signer = Signer.load(config.signing_key) if config.signing_key else None
        self.server_verifier = (
            Verifier.from_pems({"server": config.server_key.read_bytes()}) if config.server_key else None
        )
        self.reassembler = Reassembler()
        self.held: _Global | None = None
        self.model: torch.nn.Module | None = None
        self.mode: TrainingMode | None = None
        self.pending: RoundAnnouncement | None = None
        self.round_envelopes: dict[int, bytes] = {}
        self.snapshot: SnapshotAnnouncement | None = None
        self.snapshot_envelope: bytes | None = None
        self.want_snapshot = False
        self.finished = False
        self.answered: RoundAnnouncement | None = None  # a re-announcement (server restart) gets the update again
        self.rounds_done: list[int] = []
        self.session: MqttSession | None = None

    # ---- decoding the downlink -------------------------------------------------------------------
    def _decode_global(self, data: bytes) -> tuple[EnvelopeHeader, dict[str, np.ndarray]]:
        env = decode_envelope(data, self.server_verifier)
        if env.header.kind != "global" or env.header.model is None:
            raise ProtocolError("downlink envelope is not a global model")
        manifest = W.specs_from_entries(env.header.manifest)
        decoded = UpdateCodec.from_spec(env.header.codec).decode(env.payload, manifest)
        return env.header, W.densify(decoded)

    def _install(self, header: EnvelopeHeader, weights: dict[str, np.ndarray], rnd: int, ann: RoundAnnouncement) -> None:
        config = ModelConfig.from_json(json.dumps(header.model))
        mode = get_mode(ann.train.get("mode", "full"), **ann.train.get("mode_options", {}))
        if self.model is None or self.held is None or (self.held.config, self.mode) != (config, mode):
            self.model = mode.prepare(build_model(config), config)
            self.mode = mode
        ours = W.float_state(self.model)
        if [(k, v.shape) for k, v in ours.items()] != [(k, v.shape) for k, v in weights.items()]:
            raise ProtocolError("global tensors do not match the announced architecture and training mode")
        self.held = _Global(rnd, config, weights, W.state_sha256(weights))

    def _try_obtain(self, ann: RoundAnnouncement) -> bool:
        """Bring `held` to the model announced for round r, from the round's envelope or a snapshot."""
        if self.held is not None and self.held.sha256 == ann.model_sha256:
            return True
        data = self.round_envelopes.get(ann.round)
        if data is not None:
            try:
                header, payload = self._decode_global(data)
                if ann.downlink_kind == "full":
                    self._install(header, payload, ann.round - 1, ann)
                elif self.held is not None and self.held.round == ann.base_round:
                    self._install(header, W.add(self.held.weights, payload), ann.round - 1, ann)
            except (ProtocolError, CodecError, ValueError) as exc:
                log.warning("%s: unusable global for round %d: %s", self.config.site, ann.round, exc)
            self.round_envelopes.pop(ann.round, None)
            if self.held is not None and self.held.sha256 == ann.model_sha256:
                return True
        if self.snapshot is not None and self.snapshot_envelope is not None and self.snapshot.model_sha256 == ann.model_sha256:
            try:
                header, payload = self._decode_global(self.snapshot_envelope)
                self._install(header, payload, self.snapshot.round, ann)
            except (ProtocolError, CodecError, ValueError) as exc:
                log.warning("%s: unusable snapshot: %s", self.config.site, exc)
            self.snapshot_envelope = None
            if self.held is not None and self.held.sha256 == ann.model_sha256:
                self._stop_snapshot()
                return True
        if data is not None or ann.downlink_kind == "delta":
            self._start_snapshot()  # missed a round (or a corrupt delta): fetch the full model
        return False

    def _start_snapshot(self) -> None:
        if not self.want_snapshot:
            log.info("%s: fetching a full snapshot", self.config.site)
            self.want_snapshot = True
            self.session.subscribe(self.topics.snapshot, self.topics.all_snapshot_chunks)

    def _stop_snapshot(self) -> None:
        if self.want_snapshot:
            self.want_snapshot = False
            self.session.unsubscribe(self.topics.snapshot, self.topics.all_snapshot_chunks)

    # ---- training --------------------------------------------------------------------------------
    def _refusal(self, ann: RoundAnnouncement) -> str | None:
        """Why this site does not train round `ann` (the operator pinned another codec or mode), else None."""
        if self.config.codec and UpdateCodec.from_spec(self.config.codec).spec != ann.uplink_codec:
            return f"it asks for codec {ann.uplink_codec!r} but this site is configured for {self.config.codec!r}"
        mode = ann.train.get("mode", "full")
        if self.config.mode and mode != self.config.mode:
            return f"it asks for training mode {mode!r} but this site is configured for {self.config.mode!r}"
        return None

    def _train_and_send(self, ann: RoundAnnouncement) -> None:
        refusal = self._refusal(ann)
        if refusal:
            log.error("%s: skipping round %d: %s", self.config.site, ann.round, refusal)
            self.answered = ann
            return
        cached = self.state.last_update(self.config.federation, ann.round, ann.model_sha256)
        if cached is None:
            cached = self._train(ann)
        started = time.perf_counter()
        self.session.publish_chunked(
            lambda i: self.topics.update_chunk(ann.round, self.config.site, i), cached, chunk_size=self.config.chunk_size
        )
        # Measured upload time (until the broker acknowledged every chunk), for link planning.
        status = StatusMessage(
            client=self.config.site, state="online", round=ann.round,
            metrics={"upload_seconds": time.perf_counter() - started, "upload_bytes": float(len(cached))},
        )
        self.session.publish(self.topics.status(self.config.site), status.to_bytes(), retain=True)
        self.answered = ann
        if ann.round not in self.rounds_done:
            self.rounds_done.append(ann.round)
        log.info("%s: sent update for round %d (%d bytes)", self.config.site, ann.round, len(cached))

    def _train(self, ann: RoundAnnouncement) -> bytes:
        W.load_float_state(self.model, self.held.weights)
        seed = train_seed(self.config.seed, self.config.site, ann.round)
        torch.manual_seed(seed)
        train = ann.train
        result = self.task.train_local(
            self.model,
            self.indices,
            epochs=int(train.get("epochs", 1)),
            lr=float(train.get("lr", 1e-3)),
            batch_size=int(train.get("batch_size", 32)),
            seed=seed,
            device=default_device() if self.config.device == "auto" else self.config.device,
        )
        # Only what travels (e.g. LoRA adapters + head): no copy of the frozen rest of the model.
        delta = {k: v.cpu().numpy() - self.held.weights[k] for k, v in self.mode.trainable_state(self.model).items()}
        codec = UpdateCodec.from_spec(ann.uplink_codec)
        payload = codec.encode(delta, residual=self.state.residual, keep_dense=W.norm_stat_names(delta), seed=seed)
        if codec.uses_error_feedback:
            self.state.save_residual()
        header = EnvelopeHeader(
            kind="update",
            federation=self.config.federation,
            round=ann.round,
            sender=self.config.site,
            codec=codec.spec,
            manifest_sha256=W.manifest_sha256(UpdateCodec.manifest(delta)),
            num_samples=result.num_samples,
            metrics={"train_loss": result.loss, "train_accuracy": result.accuracy, "train_seconds": result.seconds},
        )
        envelope = encode_envelope(header, payload, self.signer)
        self.state.remember_update(self.config.federation, ann.round, ann.model_sha256, envelope)
        return envelope

    # ---- message handling ------------------------------------------------------------------------
    def _handle(self, msg: Message) -> None:
        try:
            info = self.topics.parse(msg.topic)
        except ValueError as exc:
            log.debug("ignored: %s", exc)
            return
        if not msg.payload:
            return  # a cleared retained message
        try:
            if info.kind == "announce":
                ann = RoundAnnouncement.from_bytes(msg.payload)
                if self.pending is None or ann.round >= self.pending.round:
                    if not ann.selected or self.config.site in ann.selected:
                        self.pending = ann
            elif info.kind == "global":
                data = self.reassembler.add(f"g{info.round}", Chunk.decode(msg.payload))
                if data is not None:
                    self.round_envelopes = {r: d for r, d in self.round_envelopes.items() if r >= info.round - 2}
                    self.round_envelopes[info.round] = data
            elif info.kind == "snapshot":
                self.snapshot = SnapshotAnnouncement.from_bytes(msg.payload)
            elif info.kind == "snapshot_chunk":
                data = self.reassembler.add("snapshot", Chunk.decode(msg.payload))
                if data is not None:
                    self.snapshot_envelope = data
            elif info.kind == "control":
                command = json.loads(msg.payload)
                if command.get("command") == "finished":
                    self.finished = True
        except (ProtocolError, ValueError) as exc:
            log.warning("%s: ignored malformed %s message: %s", self.config.site, info.kind, exc)

    def _progress(self) -> None:
        ann = self.pending
        if ann is None or ann == self.answered:
            return
        if self._try_obtain(ann):
            self._train_and_send(ann)

    def run(self, stop=None) -> list[int]:
        """Take part in rounds until the server says the federation finished (or `stop` is set)."""
        torch.set_num_threads(self.config.threads)
        link = None
        if self.config.uplink_mbps or self.config.downlink_mbps:
            from fedge.linkemu import LinkEmulator

            link = LinkEmulator(self.config.uplink_mbps, self.config.downlink_mbps)
        offline = (self.topics.status(self.config.site), StatusMessage(client=self.config.site, state="offline").to_bytes())
        self.session = MqttSession(
            self.config.broker, f"fedge-{self.config.federation}-{self.config.site}", will=offline, link=link
        )
        self.session.subscribe(self.topics.all_announcements, self.topics.all_global_chunks, self.topics.control)
        self.session.connect()
        self.session.publish(self.topics.status(self.config.site), StatusMessage(client=self.config.site, state="online").to_bytes(), retain=True)
        try:
            while not self.finished and not (stop is not None and stop.is_set()):
                msg = self.session.get(timeout=0.2)
                if msg is not None:
                    self._handle(msg)
                    while (more := self.session.get(timeout=0)) is not None:
                        self._handle(more)
                self._progress()
        finally:
            self.session.close(final=offline)
        return self.rounds_done
