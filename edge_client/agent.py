"""The edge agent's session loop: receive the global model, train on local data, send a compressed delta."""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from compression import CodecError, TensorSpec
from edge_client.config import AgentConfig
from edge_client.state import AgentState
from fedge import controlvariates as CV
from fedge import weights as W
from fedge.models import ModelConfig, build_model
from fedge.modes import TrainingMode, get_mode
from fedge.protocol import (
    Chunk,
    ControlMessage,
    ProtocolError,
    Reassembler,
    RoundAnnouncement,
    SnapshotAnnouncement,
    StatusMessage,
    Topics,
    open_record,
    sign_record,
)
from fedge.protocol.messages import ServerRecord
from fedge.protocol.signing import SignatureError, Signer, Verifier
from fedge.refusals import Refusals
from fedge.rounds import GlobalPayload, Manifest, codec_for, make_update, read_global
from fedge.tasks import ClassificationTask, default_device
from fedge.tasks.base import Task
from fedge.tasks.calibration import STATS_CODEC, shard_stats
from fedge.tasks.dp import DPSettings
from fedge.transport import Message, MqttSession, Session, SessionFactory, TlsFiles

log = logging.getLogger("fedge.agent")


def train_seed(seed: int, site: str, rnd: int) -> int:
    """The seed of a site's local training (and codec rounding) in round `rnd`: distinct per site and round."""
    return zlib.crc32(f"{seed}/{site}/{rnd}".encode())


# A model config from the wire is small: building one of 20,000 layers took 17 s even on the meta device.
MAX_CONFIG_BYTES = 64 << 10
MAX_CONFIG_LIST = 64


def _check_config_size(config: ModelConfig) -> None:
    """ValueError for a config whose JSON or any list in it (layer widths) is longer than a model has."""
    if len(config.to_json()) > MAX_CONFIG_BYTES:
        raise ValueError(f"model config over {MAX_CONFIG_BYTES} bytes")
    stack: list[object] = [config.options]
    while stack:
        value = stack.pop()
        if isinstance(value, list | tuple) and len(value) > MAX_CONFIG_LIST:
            raise ValueError(f"model config holds a list of {len(value)} items, more than {MAX_CONFIG_LIST}")
        stack.extend(value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ())


@dataclass
class _Global:
    """The model an agent holds: the global after round `round`."""

    round: int
    config: ModelConfig
    weights: dict[str, np.ndarray]
    sha256: str


class Agent:
    def __init__(self, config: AgentConfig, task: Task, indices: np.ndarray | None = None):
        self.config = config
        self.task = task
        self.indices = indices
        self.topics = Topics(config.federation)
        self.state = AgentState(config.state_dir)
        self.signer = Signer.load(config.signing_key) if config.signing_key else None
        self.server_verifier = Verifier.from_pems({"server": config.server_key.read_bytes()}) if config.server_key else None
        self.reassembler = Reassembler(max_open=8)
        self.refusals = Refusals(log)
        # The server's run this agent takes part in, and the newest issued_at seen from it: an older
        # run's records are replays. Kept in the state folder across restarts.
        known = self.state.known_run(config.federation)
        self.run_id: str | None = known[0] if known else None
        self.run_issued: float = known[1] if known else 0.0
        self.held: _Global | None = None
        self.model: torch.nn.Module | None = None
        self.mode: TrainingMode | None = None
        self.pending: RoundAnnouncement | None = None
        # Downlink transfers of announcements a re-announcement replaced: their late chunks are the
        # server's own, not a refusal.
        self.superseded: deque[str] = deque(maxlen=16)
        self.round_envelopes: dict[int, bytes] = {}
        self.snapshot: SnapshotAnnouncement | None = None
        self.snapshot_envelope: bytes | None = None
        self.want_snapshot = False
        self.finished = False
        self.answered: RoundAnnouncement | None = None  # a re-announcement (server restart) gets the update again
        self.rounds_done: list[int] = []
        self.session: Session | None = None

    @property
    def _mq(self) -> Session:
        if self.session is None:
            raise RuntimeError("the agent is not connected: call run()")
        return self.session

    # ---- decoding the downlink -------------------------------------------------------------------
    def _read_global(self, data: bytes, sha256: str, ann: RoundAnnouncement) -> GlobalPayload:
        """`sha256` comes from the signed record that announced these bytes; the global must carry
        exactly the tensors of the model its config builds in the announced mode."""
        return read_global(
            data, sha256=sha256, federation=self.config.federation, run=self.run_id, verifier=self.server_verifier,
            expect=lambda header, config: self._expected_manifest(header.base_round is not None, config, ann),
        )  # fmt: skip

    def _model_for(self, config: ModelConfig, ann: RoundAnnouncement, *, meta: bool) -> tuple[torch.nn.Module, TrainingMode]:
        """The model `config` builds in the announced mode: the one held when neither changed, else
        built (on the meta device when only its tensors' names and shapes are needed). A mode or
        config from the wire that does not build, or builds over max_model_mb, is a ProtocolError."""
        try:
            mode = get_mode(ann.train.mode, **ann.train.mode_options)
            if self.model is not None and self.held is not None and (self.held.config, self.mode) == (config, mode):
                return self.model, mode
            _check_config_size(config)
            with torch.device("meta"):  # sized without allocating: a config from the wire may name any width
                probe = mode.prepare(build_model(config), config)
            size = sum(t.numel() * 4 for t in probe.state_dict().values())
            if size > self.config.max_model_mb << 20:
                raise ValueError(f"it builds {size >> 20} MiB of float32 state, over max_model_mb={self.config.max_model_mb}")
            return (probe if meta else mode.prepare(build_model(config), config)), mode
        except Exception as exc:  # mode and config come from the wire: wrong types, impossible sizes
            raise ProtocolError(f"the announced mode and the global's model config do not build: {type(exc).__name__}: {exc}"[:300]) from None

    def _expected_manifest(self, delta: bool, config: ModelConfig, ann: RoundAnnouncement) -> Manifest:
        """What a global for this config may carry: every float tensor of the model, or for a delta the ones that travel."""
        model, mode = self._model_for(config, ann, meta=True)
        full = Manifest(tuple(TensorSpec(k, shape) for k, shape in self._global_shapes(model, ann).items()))
        return full.only(set(mode.trainable_state(model)) | {t.name for t in full if CV.is_variate(t.name)}) if delta else full

    def _global_shapes(self, model: torch.nn.Module, ann: RoundAnnouncement) -> dict[str, tuple[int, ...]]:
        """Names and shapes of what a global holds for `model` under `ann`: its float tensors but the
        site's own layers (FedBN), then SCAFFOLD's server variates when announced."""
        local = self._local_names(model, ann)
        floats = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point() and k not in local}
        return floats | (CV.variate_shapes(model, local) if ann.train.control_variates else {})

    @staticmethod
    def _local_names(model: torch.nn.Module, ann: RoundAnnouncement) -> frozenset[str]:
        """The tensors this site keeps to itself (FedBN's normalisation layers when announced)."""
        return W.norm_layer_names(model) if ann.train.local_norm else frozenset()

    def _install(self, glob: GlobalPayload, weights: dict[str, np.ndarray], rnd: int, ann: RoundAnnouncement) -> None:
        model, mode = self._model_for(glob.config, ann, meta=False)
        local = self._local_names(model, ann)
        if list(self._global_shapes(model, ann).items()) != [(k, tuple(v.shape)) for k, v in weights.items()]:
            raise ProtocolError("global tensors do not match the announced architecture and training mode")
        if local and model is not self.model:  # a fresh model (agent restart): this site's own layers, as it left them
            self.state.restore_local(model, local)
        self.model, self.mode = model, mode
        self.held = _Global(rnd, glob.config, weights, W.state_sha256(weights))

    def _try_obtain(self, ann: RoundAnnouncement) -> bool:
        """Bring `held` to the model announced for round r, from the round's envelope or a snapshot."""
        if self.held is not None and self.held.sha256 == ann.model_sha256:
            return True
        data = self.round_envelopes.get(ann.round)
        if data is not None:
            try:
                glob = self._read_global(data, ann.downlink.sha256, ann)
                if ann.downlink_kind == "full" and not glob.is_delta:
                    self._install(glob, glob.tensors, ann.round - 1, ann)
                # A delta "from round r-1" applies to the global that round r-1 started from, which `held`
                # records as the global after round r-2 (held.round); the model hash below checks the result.
                elif glob.is_delta and self.held is not None and self.held.round + 1 == ann.base_round == glob.header.base_round:
                    self._install(glob, W.add(self.held.weights, glob.tensors), ann.round - 1, ann)
            except (ProtocolError, CodecError, ValueError) as exc:
                self.refusals("bad-global", f"unusable global for round {ann.round}: {exc}")
            self.round_envelopes.pop(ann.round, None)
            if self.held is not None and self.held.sha256 == ann.model_sha256:
                return True
        if self.snapshot is not None and self.snapshot_envelope is not None and self.snapshot.model_sha256 == ann.model_sha256:
            try:
                glob = self._read_global(self.snapshot_envelope, self.snapshot.transfer.sha256, ann)
                if glob.is_delta:
                    raise ProtocolError("a snapshot must carry the whole model")
                self._install(glob, glob.tensors, self.snapshot.round, ann)
            except (ProtocolError, CodecError, ValueError) as exc:
                self.refusals("bad-global", f"unusable snapshot: {exc}")
            self.snapshot_envelope = None
            if self.held is not None and self.held.sha256 == ann.model_sha256:
                self._stop_snapshot()
                return True
        if ann.downlink_kind == "delta":
            self._start_snapshot()  # missed a round (or a corrupt delta): fetch the full model
        # A full global that is missing or corrupt: the deadline's re-announcement publishes it again.
        return False

    def _start_snapshot(self) -> None:
        if not self.want_snapshot:
            log.info("%s: fetching a full snapshot", self.config.site)
            self.want_snapshot = True
            self._mq.subscribe(self.topics.snapshot, self.topics.all_snapshot_chunks)

    def _stop_snapshot(self) -> None:
        if self.want_snapshot:
            self.want_snapshot = False
            self._mq.unsubscribe(self.topics.snapshot, self.topics.all_snapshot_chunks)

    # ---- training --------------------------------------------------------------------------------
    def _refusal(self, ann: RoundAnnouncement) -> str | None:
        """Why this site does not train round `ann` (the operator pinned another codec or mode), else None."""
        if ann.train.calibrate_head:
            if not self.config.head_stats:
                return "it asks for this site's class counts and feature sums (head calibration), which this site does not share (head_stats: false)"
            if not isinstance(self.task, ClassificationTask):
                return f"it asks for head calibration, and the {self.task.name} task has no classifier head"
            if ann.uplink_codec != STATS_CODEC:
                return f"its head statistics would travel with codec {ann.uplink_codec!r}, not the lossless {STATS_CODEC!r}"
        elif self.config.codec and codec_for(self.config.codec).spec != ann.uplink_codec:
            return f"it asks for codec {ann.uplink_codec!r} but this site is configured for {self.config.codec!r}"
        mode = ann.train.mode
        if self.config.mode and mode != self.config.mode:
            return f"it asks for training mode {mode!r} but this site is configured for {self.config.mode!r}"
        try:
            get_mode(mode, **ann.train.mode_options)
        except (TypeError, ValueError) as exc:
            return f"its {mode} mode options are invalid: {exc}"
        return None

    def _train_and_send(self, ann: RoundAnnouncement) -> None:
        refusal = self._refusal(ann)
        if refusal:
            log.error("%s: skipping round %d: %s", self.config.site, ann.round, refusal)
            self.answered = ann
            return
        cached = self.state.last_update(self.config.federation, ann.run, ann.round, ann.model_sha256)
        if cached is None:
            cached = self._train(ann)
        started = time.perf_counter()
        self._mq.publish_chunked(lambda i: self.topics.update_chunk(ann.round, self.config.site, i), cached, chunk_size=self.config.chunk_size)
        # Measured upload time (until the broker acknowledged every chunk), for link planning; the site's DP-SGD spend.
        metrics = {"upload_seconds": time.perf_counter() - started, "upload_bytes": float(len(cached))}
        if self.state.privacy.history:
            metrics["dp_epsilon"] = self.state.privacy.epsilon(ann.train.dp_delta)
        status = self._status("online", round=ann.round, metrics=metrics)
        self._mq.publish(self.topics.status(self.config.site), status, retain=True)
        self.answered = ann
        if ann.round not in self.rounds_done:
            self.rounds_done.append(ann.round)
        log.info("%s: sent update for round %d (%d bytes)", self.config.site, ann.round, len(cached))

    def _train(self, ann: RoundAnnouncement) -> bytes:
        if self.model is None or self.held is None or self.mode is None:
            raise RuntimeError("no global model installed: _try_obtain must succeed before training")
        if ann.train.calibrate_head:
            return self._head_stats(ann)
        local = self._local_names(self.model, ann)
        weights, server_variates = CV.split(self.held.weights)
        W.load_float_state(self.model, weights, local=local)
        own_variates = self.state.load_variates() if ann.train.control_variates else {}
        seed = train_seed(self.config.seed, self.config.site, ann.round)
        torch.manual_seed(seed)
        train = ann.train
        dp = DPSettings(train.dp_noise_multiplier, train.dp_max_grad_norm, train.dp_delta) if train.dp_noise_multiplier else None
        result = self.task.train_local(
            self.model,
            self.indices,
            epochs=train.epochs,
            lr=train.lr,
            batch_size=train.batch_size,
            seed=seed,
            device=default_device() if self.config.device == "auto" else self.config.device,
            dp=dp,
            prox_mu=train.prox_mu,
            augment=train.augment,
            logit_adjust=train.logit_adjust,
            optimizer=train.optimizer,
            correction=CV.correction(server_variates, own_variates, self.state.residual) if train.control_variates else None,
        )
        if dp is not None:  # counted once trained, before anything is sent: a crash can only over-count
            self.state.privacy.record(dp.noise_multiplier, result.dp_sample_rate, result.dp_steps)
            self.state.save_privacy()
        # Only what travels (e.g. LoRA adapters + head): no copy of the frozen rest of the model.
        delta = {k: v.cpu().numpy() - self.held.weights[k] for k, v in self.mode.trainable_state(self.model).items() if k not in local}
        if result.mean_gradient is not None:  # SCAFFOLD: the change of this site's variate travels beside the delta
            delta |= CV.update_entries(result.mean_gradient, own_variates)
        envelope = make_update(
            delta, codec=ann.uplink_codec, federation=self.config.federation, site=self.config.site, round=ann.round, run=ann.run,
            model_sha256=ann.model_sha256, num_samples=result.num_samples, residual=self.state.residual, seed=seed, signer=self.signer,
            metrics={"train_loss": result.loss, "train_accuracy": result.accuracy, "train_seconds": result.seconds},
        )  # fmt: skip
        # The update is cached before the residual that includes it is committed: a crash between
        # the two resends this update (with the older residual), never trains the round twice.
        self.state.remember_update(self.config.federation, ann.run, ann.round, ann.model_sha256, envelope)
        if local:
            self.state.save_local(self.model, local)
        if result.mean_gradient is not None:
            self.state.save_variates(result.mean_gradient)
        if codec_for(ann.uplink_codec).uses_error_feedback:
            self.state.save_residual()
        return envelope

    def _head_stats(self, ann: RoundAnnouncement) -> bytes:
        """A calibration round: no training, and nothing of this site's training state changes; the
        statistics of the global's head input over this site's images, lossless."""
        assert self.model is not None and self.held is not None and isinstance(self.task, ClassificationTask)  # _refusal, _train
        W.load_float_state(self.model, CV.split(self.held.weights)[0], local=self._local_names(self.model, ann))
        started = time.perf_counter()
        stats = shard_stats(self.model, self.task.splits, self.indices)
        envelope = make_update(
            stats.to_tensors(), codec=STATS_CODEC, federation=self.config.federation, site=self.config.site, round=ann.round, run=ann.run,
            model_sha256=ann.model_sha256, num_samples=int(stats.counts.sum()), metrics={"train_seconds": time.perf_counter() - started},
            signer=self.signer,
        )  # fmt: skip
        self.state.remember_update(self.config.federation, ann.run, ann.round, ann.model_sha256, envelope)
        return envelope

    # ---- message handling ------------------------------------------------------------------------
    def _status(self, state: Literal["online", "offline", "training", "done"], **fields: Any) -> bytes:
        return sign_record(StatusMessage(federation=self.config.federation, sender=self.config.site, state=state, **fields), self.signer)

    def _record(self, raw: bytes, cls: type, what: str):
        """A server record, or None (refused: logged and counted)."""
        try:
            return open_record(raw, cls, self.server_verifier, federation=self.config.federation, sender="server")
        except SignatureError as exc:
            self.refusals("bad-signature", f"{what}: {exc}")
        except ProtocolError as exc:
            self.refusals("bad-record", f"{what}: {exc}")
        return None

    def _in_run(self, record: ServerRecord, what: str) -> bool:
        """Records of the run this agent is in pass; a newer run replaces it (the server started a
        new one); an older run's records are replays and are refused."""
        if record.run == self.run_id:
            self.run_issued = max(self.run_issued, record.issued_at)
            return True
        if self.run_id is None or record.issued_at > self.run_issued:
            if self.run_id is not None:
                log.warning("%s: the server started run %s (was %s)", self.config.site, record.run, self.run_id)
            self.run_id, self.run_issued = record.run, record.issued_at
            self.state.remember_run(self.config.federation, record.run, record.issued_at)
            self.pending = self.answered = self.snapshot = None
            self.snapshot_envelope = None
            return True
        self.refusals("wrong-run", f"{what} of run {record.run}, older than this agent's run {self.run_id}")
        return False

    def _handle(self, msg: Message) -> None:
        """Never raises: whatever a message does wrong is refused, logged and counted."""
        try:
            self._dispatch(msg)
        except Exception as exc:  # a bug or an input nobody foresaw must not stop the agent
            log.exception("%s: message on %s", self.config.site, msg.topic)
            self.refusals("handler-error", f"{msg.topic}: {type(exc).__name__}: {exc}")

    def _dispatch(self, msg: Message) -> None:
        try:
            info = self.topics.parse(msg.topic)
        except ValueError as exc:
            self.refusals("bad-topic", str(exc))
            return
        if not msg.payload:
            return  # a cleared retained message
        try:
            if info.kind == "announce":
                ann = self._record(msg.payload, RoundAnnouncement, f"announcement on {msg.topic}")
                if ann is not None and ann.round != info.round:
                    self.refusals("bad-record", f"announcement of round {ann.round} on the topic of round {info.round}")
                elif ann is None or not self._in_run(ann, "announcement"):
                    return
                elif self.pending is None or ann.round >= self.pending.round:
                    if not ann.selected or self.config.site in ann.selected:
                        if self.pending is not None and self.pending.downlink.transfer != ann.downlink.transfer:
                            self.superseded.append(self.pending.downlink.transfer)
                        self.pending = ann
            elif info.kind == "global" and info.round is not None:
                chunk = Chunk.decode(msg.payload)
                ann = self.pending
                if ann is not None and ann.round == info.round and chunk.transfer.hex() != ann.downlink.transfer:
                    if chunk.transfer.hex() not in self.superseded:
                        self.refusals("bad-chunk", f"global chunk of round {info.round} from a transfer the announcement does not name")
                    return
                data = self.reassembler.add(f"g{info.round}", chunk)
                if data is not None:
                    self.round_envelopes = {r: d for r, d in self.round_envelopes.items() if r >= info.round - 2}
                    self.round_envelopes[info.round] = data
            elif info.kind == "snapshot":
                snapshot = self._record(msg.payload, SnapshotAnnouncement, "snapshot announcement")
                if snapshot is not None and self._in_run(snapshot, "snapshot announcement"):
                    self.snapshot = snapshot
            elif info.kind == "snapshot_chunk":
                data = self.reassembler.add("snapshot", Chunk.decode(msg.payload))
                if data is not None:
                    self.snapshot_envelope = data
            elif info.kind == "control":
                control = self._record(msg.payload, ControlMessage, "control message")
                if control is not None and self.run_id is not None and control.run != self.run_id:
                    self.refusals("wrong-run", f"control message of run {control.run}, not this agent's run {self.run_id}")
                elif control is not None and control.command == "finished":
                    self.run_id = control.run
                    self.finished = True
        except ProtocolError as exc:
            self.refusals("bad-chunk", f"{info.kind} message on {msg.topic}: {exc}")

    def _progress(self) -> None:
        """Never raises: a round that fails here (disk full, a bug) is skipped, logged and counted,
        and the agent waits for the next announcement instead of exiting (a service restart would
        only fail the same way)."""
        ann = self.pending
        if ann is None or ann == self.answered:
            return
        try:
            if self._try_obtain(ann):
                self._train_and_send(ann)
        except Exception as exc:
            log.exception("%s: round %d failed", self.config.site, ann.round)
            self.refusals("round-error", f"round {ann.round}: {type(exc).__name__}: {exc}")
            self.answered = ann

    def run(self, stop: threading.Event | None = None, transport: SessionFactory | None = None) -> list[int]:
        """Take part in rounds until the server says the federation finished (or `stop` is set);
        `transport` (default: MQTT to the configured broker) makes the session."""
        torch.set_num_threads(self.config.threads)
        link = None
        if self.config.uplink_mbps or self.config.downlink_mbps:
            from fedge.linkemu import LinkEmulator

            link = LinkEmulator(self.config.uplink_mbps, self.config.downlink_mbps)
        offline = (self.topics.status(self.config.site), self._status("offline"))
        tls, client_id = None, f"fedge-{self.config.federation}-{self.config.site}"
        if self.config.cert is not None:
            from fedge.identity import certificate_identity

            tls = TlsFiles(self.config.ca, self.config.cert, self.config.key)
            client_id = certificate_identity(self.config.cert)
        factory = transport or partial(MqttSession, self.config.broker)
        self.session = factory(client_id, will=offline, link=link, tls=tls, refuse=self.refusals)
        self._mq.subscribe(self.topics.all_announcements, self.topics.all_global_chunks, self.topics.control)
        self.session.connect()
        self._mq.publish(self.topics.status(self.config.site), self._status("online"), retain=True)
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
            if self.refusals.total:
                log.warning("%s: refused inputs, by kind: %s", self.config.site, json.dumps(dict(self.refusals.counts), sort_keys=True))
        return self.rounds_done
