"""The round state machine: announce -> collect (quorum + all selected, or deadline) -> aggregate
-> checkpoint -> announce the next round. Resumes from the last checkpoint after a restart."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.numpy import load_file, save

from compression import ErrorFeedback, TensorSpec, UpdateCodec
from fedge import controlvariates as CV
from fedge import weights as W
from fedge.checkpoint import init_from_checkpoint
from fedge.errors import UsageError
from fedge.files import atomic_write_bytes
from fedge.models import ModelConfig, build_model
from fedge.modes import get_mode
from fedge.protocol import (
    Chunk,
    ControlMessage,
    ProtocolError,
    Reassembler,
    RoundAnnouncement,
    SnapshotAnnouncement,
    StatusMessage,
    Topics,
    TrainSettings,
    open_record,
    sign_record,
)
from fedge.protocol.signing import SignatureError, Signer, Verifier
from fedge.refusals import Refusals
from fedge.rounds import (
    FULL_MODEL_CODEC,
    Expected,
    Manifest,
    codec_for,
    make_global,
)
from fedge.schedule import scheduled_lr
from fedge.tasks.calibration import STATS_CODEC, FeatureStats, lda_head, linear_head, stats_shapes
from fedge.transport import Message, MqttSession, Session, SessionFactory, TlsFiles
from server.config import ServerConfig
from server.intake import Decoded, UpdateIntake
from server.store import CheckpointStore, RoundState
from server.strategies import ClientUpdate, announced_train, get_strategy

log = logging.getLogger("fedge.server")

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class _Round:
    number: int
    selected: tuple[str, ...]
    deadline: float
    started: float
    downlink_bytes: int
    model_sha256: str
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    nonces: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)  # updates whose aggregate was not finite
    decoding: set[str] = field(default_factory=set)  # updates reassembled, in the intake (server.intake)


class RoundServer:
    def __init__(
        self,
        config: ServerConfig,
        evaluator: Evaluator | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """`clock` gives the wall time that round deadlines are set and checked against (tests move it
        past a deadline instead of waiting for it)."""
        self.config = config
        self.clock = clock
        self.topics = Topics(config.federation)
        self.evaluator = evaluator
        self.on_round = on_round
        self.mode = get_mode(config.train.mode, **config.train.mode_options)
        self.model_config, template = self._initial_model()
        self.template = template
        self.strategy = get_strategy(config.strategy, **config.strategy_options)
        self.train = announced_train(config.train, self.strategy)  # e.g. FedProx's mu, FedBN's local normalisation
        # FedBN: the sites' normalisation layers are in neither the global, its checkpoints, nor any update.
        self.local_names = W.norm_layer_names(template) if self.train.local_norm else frozenset()
        self.store = CheckpointStore(config.checkpoint_dir, self.model_config, template, self.mode, config.dataset, local=self.local_names)
        self.uplink = codec_for(config.uplink_codec)
        self.downlink = codec_for(config.downlink_codec) if config.downlink_codec else None
        self.downlink_residual = ErrorFeedback()
        self._pending_delta: bytes | None = None  # next round's downlink delta envelope (lost on restart: full then)
        self.refusals = Refusals(log)
        self.verifier = Verifier.from_dir(config.trusted_keys) if config.trusted_keys else None
        self.signer = Signer.load(config.signing_key) if config.signing_key else None
        self.online: set[str] = set()
        self.rejections: list[tuple[int, str, str]] = []  # (round, client, reason) of updates, for operators and tests
        # Which (round, sites) may send update chunks now: read by paho's thread to drop the rest unread.
        # The set is edited in place by the round loop only (membership tests and add/discard are atomic under the GIL).
        self._open: tuple[int, set[str]] | None = None
        self.uploads: dict[tuple[int, str], dict[str, float]] = {}  # sites' measured upload time and bytes
        self.session: Session | None = None
        self._strategy_state: dict[str, np.ndarray] = {}
        self.state = self._initial_state()
        self.strategy.resume(self.state.round)  # e.g. DP-FedAvg's accountant counts the rounds already published
        self.strategy.load_state(self._strategy_state)
        self.run_id = self.store.run_id()
        self.manifest = Manifest.of(self.state.weights)
        # What travels up (and as downlink deltas): the mode's trainable tensors only, e.g. LoRA adapters + head.
        trainable = self.mode.trainable_state(template)
        self.uplink_manifest = self.manifest.only(set(trainable) | {k for k in self.state.weights if CV.is_variate(k)})
        # With --calibrate-head, one round after the last: the sites send feature statistics, not deltas.
        self.last_round = config.rounds + int(config.calibrate_head)
        self.head: tuple[str, str] | None = None
        self.stats_manifest: Manifest | None = None
        if config.calibrate_head:
            self.head, self.stats_manifest = self._head_of(template)
        # One open transfer per site, never larger than an update of these manifests can be.
        manifests = [self.uplink_manifest] + ([self.stats_manifest] if self.stats_manifest else [])
        self.max_update_bytes = max(UpdateCodec.max_payload_bytes(list(m)) for m in manifests) + (1 << 20) + 1024
        self.reassembler = Reassembler(max_bytes=self.max_update_bytes, one_per_key=True)
        self.intake = UpdateIntake(config.decode_workers, verifier=self.verifier, trusted_keys=config.trusted_keys,
                                   max_norm=config.max_update_norm)  # fmt: skip

    # ---- state -------------------------------------------------------------------------------
    def _initial_model(self) -> tuple[ModelConfig, torch.nn.Module]:
        """The training-time global model: seeded or pretrained, pruned once by the server in `pruned` mode."""
        torch.manual_seed(self.config.seed)
        config = self.config.model
        if self.config.init_checkpoint is not None:
            model, config = init_from_checkpoint(
                str(self.config.init_checkpoint),
                in_channels=config.in_channels,
                num_classes=config.num_classes,
                image_size=config.image_size,
                dataset=self.config.dataset,
            )
        else:
            model = build_model(config)
        model, config, pruned = self.mode.global_model(model, config)
        if pruned is not None:
            log.warning("pruned the global model: %s", pruned)
        return config, self.mode.prepare(model, config)

    def _initial_state(self) -> RoundState:
        resumed = self.store.load_latest()
        if resumed is not None:
            state, record = resumed
            state.weights |= self._variates(record)
            residual_file = record.get("downlink_residual")
            if residual_file:
                path = self.store.folder / residual_file
                self.downlink_residual.load_bytes(path.read_bytes(), str(path))
            if not all(np.isfinite(v).all() for v in state.weights.values()):
                raise ValueError(f"checkpoint {record['model']} in {self.store.folder} holds NaN/Inf weights; move it and state.json aside")
            strategy_file = record.get("strategy_state")
            if strategy_file:  # a server optimizer's moments, restored after resume() below
                self._strategy_state = load_file(str(self.store.folder / strategy_file))
            log.warning("resuming federation %s after round %d (checkpoint in %s)", self.config.federation, state.round, self.store.folder)
            return state
        return RoundState(0, {k: v for k, v in W.float_state(self.template).items() if k not in self.local_names} | self._variates(None))

    def _head_of(self, template: torch.nn.Module) -> tuple[tuple[str, str], Manifest]:
        """The global's names of the linear head that a calibration round refits, and the manifest of
        the statistics the sites send for it; UsageError for a model without one."""
        try:
            head = linear_head(template)
        except ValueError as exc:
            raise UsageError(f"--calibrate-head: {exc} (mode {self.config.train.mode}); calibrate a classifier in mode full, pruned or qat") from None
        names = {id(p): n for n, p in template.named_parameters()}
        weight, bias = names.get(id(head.weight)), names.get(id(head.bias))
        if weight not in self.state.weights or bias not in self.state.weights:
            raise UsageError(f"--calibrate-head: the head's weights are not in the global model (mode {self.config.train.mode}); use mode full")
        shapes = stats_shapes(head.out_features, head.in_features)
        return (str(weight), str(bias)), Manifest(tuple(TensorSpec(k, shape) for k, shape in shapes.items()))

    def _calibrating(self, rnd: int) -> bool:
        """Round `rnd` is the head-calibration round (the one after the configured rounds)."""
        return self.head is not None and rnd > self.config.rounds

    def _variates(self, record: dict[str, Any] | None) -> dict[str, np.ndarray]:
        """SCAFFOLD's server variate c (part of the global: fedge.controlvariates): from the checkpoint
        `record` names, else zero (round 1, or a folder written under another strategy)."""
        if not self.train.control_variates:
            return {}
        zero = CV.zero_variates(self.template, self.local_names)
        name = (record or {}).get("control_variates")
        if not name:
            return zero
        try:
            saved = load_file(str(self.store.folder / name))
        except Exception as exc:  # missing or damaged: say which file and what to do, not a library traceback
            raise ValueError(f"{name} in {self.store.folder} is unreadable ({type(exc).__name__}: {exc}); move it and state.json aside") from None
        if sorted((k, v.shape) for k, v in saved.items()) != sorted((k, v.shape) for k, v in zero.items()):
            raise ValueError(f"{name} in {self.store.folder} does not hold this model's control variates; move it and state.json aside")
        return {k: saved[k].astype(np.float32) for k in zero}

    def global_model(self) -> torch.nn.Module:
        """The current global as a training-time module (what the evaluator scores)."""
        W.load_float_state(self.template, CV.split(self.state.weights)[0], local=self.local_names)
        return self.template

    def _checkpoint(self) -> None:
        """Weights and downlink residual are written under this round's names first; state.json,
        which names both, is the commit. A crash before it leaves the previous round whole."""
        extra = {}
        if self.downlink is not None:
            name = f"downlink_residual_{self.state.round:04d}.safetensors"
            atomic_write_bytes(self.store.folder / name, self.downlink_residual.to_bytes())
            extra["downlink_residual"] = name
        variates = {k: v for k, v in self.state.weights.items() if CV.is_variate(k)}
        if variates:  # beside the model's checkpoint, which stays an exportable model
            name = f"control_variates_{self.state.round:04d}.safetensors"
            atomic_write_bytes(self.store.folder / name, save(variates))
            extra["control_variates"] = name
        strategy_state = self.strategy.state()
        if strategy_state:
            name = f"strategy_state_{self.state.round:04d}.safetensors"
            atomic_write_bytes(self.store.folder / name, save(strategy_state))
            extra["strategy_state"] = name
        self.store.save(self.state, self.config.federation, extra)
        kept = (("downlink_residual*.safetensors", "downlink_residual"), ("strategy_state*.safetensors", "strategy_state"),
                ("control_variates*.safetensors", "control_variates"))  # fmt: skip
        for pattern, key in kept:
            for old in self.store.folder.glob(pattern):
                if old.name != extra.get(key):
                    old.unlink(missing_ok=True)

    # ---- wire ----------------------------------------------------------------------------------
    def _global(self, rnd: int, tensors: dict[str, np.ndarray], *, codec: str = FULL_MODEL_CODEC, base_round: int | None = None,
                residual: ErrorFeedback | None = None) -> tuple[bytes, dict[str, np.ndarray]]:  # fmt: skip
        """The signed global envelope that starts round `rnd`, and what the agents will decode from it."""
        return make_global(
            tensors, config=self.model_config, federation=self.config.federation, run=self.run_id, round=rnd,
            sender=self.config.client_id, codec=codec, base_round=base_round, residual=residual, signer=self.signer,
        )  # fmt: skip

    def _publish_round(self, rnd: int, selected: tuple[str, ...]) -> int:
        """Publish round r's global: a delta from r-1 when a downlink codec is set, beside the full
        model as the snapshot (for agents that missed a round); else the full model, once."""
        previous = self.state.weights
        sha = W.state_sha256(previous)
        full_env, _ = self._global(rnd, previous)
        kind: Literal["full", "delta"]
        base: int | None
        if self._pending_delta is not None and rnd > 1:
            env, kind, base = self._pending_delta, "delta", rnd - 1
            snapshot = self._mq.publish_chunked(self.topics.snapshot_chunk, full_env, chunk_size=self.config.chunk_size, retain=True)
            self._publish_record(self.topics.snapshot, SnapshotAnnouncement(round=rnd - 1, model_sha256=sha, transfer=snapshot, **self._signed_by()))
        else:
            env, kind, base = full_env, "full", None
        transfer = self._mq.publish_chunked(lambda i: self.topics.global_chunk(rnd, i), env, chunk_size=self.config.chunk_size, retain=True)
        announcement = RoundAnnouncement(
            round=rnd,
            deadline=self.clock() + self.config.round_timeout,
            selected=selected,
            model_sha256=sha,
            downlink=transfer,
            downlink_kind=kind,
            base_round=base,
            uplink_codec=STATS_CODEC if self._calibrating(rnd) else self.uplink.spec,
            train=self.train_for(rnd),
            **self._announced(),
            **self._signed_by(),
        )
        self._publish_record(self.topics.announce(rnd), announcement)
        return len(env)

    @property
    def _mq(self) -> Session:
        if self.session is None:
            raise RuntimeError("the server is not connected: call run()")
        return self.session

    def train_for(self, rnd: int) -> TrainSettings:
        """What round (or version) `rnd` announces: the training settings, with the scheduled lr; the
        calibration round's say to send statistics instead."""
        if self._calibrating(rnd):
            return self.train.model_copy(update={"calibrate_head": True})
        lr = scheduled_lr(self.train.lr, rnd, self.config.rounds, self.config.lr_schedule)
        return self.train if lr == self.train.lr else self.train.model_copy(update={"lr": lr})

    def _announced(self) -> dict[str, Any]:
        """Announcement fields of a rounds mode (server.fedbuff: max_staleness); none for synchronous rounds."""
        return {}

    def _signed_by(self) -> dict[str, Any]:
        return {"federation": self.config.federation, "sender": self.config.client_id, "run": self.run_id}

    def _publish_record(self, topic: str, record: Any) -> None:
        self._mq.publish(topic, sign_record(record, self.signer), retain=True)

    def _clear_round(self, rnd: int, chunks: int, *, keep_uploads: bool = False) -> None:
        """Drop a finished round's retained messages so late subscribers do not fetch stale data, and
        its half-received updates unless `keep_uploads` (asynchronous rounds still take them)."""
        for i in range(chunks):
            self._mq.publish(self.topics.global_chunk(rnd, i), b"", retain=True)
        self._mq.publish(self.topics.announce(rnd), b"", retain=True)
        if not keep_uploads:
            self.reassembler.discard(f"{rnd}/")

    # ---- message handling ----------------------------------------------------------------------
    def _accept(self, topic: str) -> str | None:
        """Runs in paho's thread for every message: update chunks from anyone the open round does
        not wait for are dropped here, before they are queued, reassembled or parsed."""
        prefix = f"{self.topics.root}/round/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 4 or parts[1] != "update":
            return None
        open_round = self._open
        if open_round is None or parts[0] != str(open_round[0]):
            return f"round {parts[0]} is not open"
        if parts[2] not in open_round[1]:
            return f"no update expected from {parts[2]!r} (not selected, or already counted)"
        return None

    @property
    def awaiting(self) -> tuple[int, frozenset[str]] | None:
        """The open round and the selected sites whose update it still waits for (None between rounds)."""
        open_round = self._open
        return None if open_round is None else (open_round[0], frozenset(open_round[1]))

    def _set_open(self, current: _Round | None) -> None:
        if current is None:
            self._open = None
        else:
            self._open = (current.number, set(current.selected) - set(current.updates) - current.excluded - current.decoding)

    def _expect(self, current: _Round, client: str, expected: bool) -> None:
        """O(1) edit of the open set: rebuilding it per message cost O(sites), seconds a round at 1000 sites."""
        open_round = self._open
        if open_round is not None and open_round[0] == current.number:
            (open_round[1].add if expected else open_round[1].discard)(client)

    def _handle(self, msg: Message, current: _Round | None) -> None:
        """Never raises: whatever a message does wrong is refused, logged and counted."""
        try:
            self._dispatch(msg, current)
        except Exception as exc:  # a bug or an input nobody foresaw must not stop the federation
            log.exception("message on %s", msg.topic)
            self.refusals("handler-error", f"{msg.topic}: {type(exc).__name__}: {exc}")

    def _dispatch(self, msg: Message, current: _Round | None) -> None:
        try:
            info = self.topics.parse(msg.topic)
        except ValueError as exc:
            self.refusals("bad-topic", str(exc))
            return
        if info.kind == "status" and info.client is not None:
            if msg.payload:
                self._handle_status(info.client, msg.payload)
        elif info.kind == "update" and info.round is not None and info.client is not None:
            self._handle_update(info.round, info.client, msg.payload, current)

    def _handle_status(self, client: str, raw: bytes) -> None:
        try:
            status = open_record(raw, StatusMessage, self.verifier, federation=self.config.federation, sender=client)
        except ProtocolError as exc:
            self.refusals("bad-signature" if isinstance(exc, SignatureError) else "bad-status", f"status of {client}: {exc}")
            return
        (self.online.add if status.state != "offline" else self.online.discard)(client)
        if status.round is not None and "upload_seconds" in status.metrics:
            self.uploads[(status.round, client)] = status.metrics

    def _reject(self, rnd: int, client: str, kind: str, reason: str, current: _Round | None) -> None:
        self.refusals(kind, f"update from {client} for round {rnd}: {reason}")
        self.rejections.append((rnd, client, reason))
        del self.rejections[:-1000]
        if current is not None:
            current.rejected.append(f"{client}: {reason}")

    def _expected(self, current: _Round, client: str) -> Expected:
        max_samples = min(self.config.max_samples, self.config.site_max_samples.get(client, self.config.max_samples))
        stats = self.stats_manifest if self._calibrating(current.number) else None  # the calibration round's statistics
        return Expected(
            federation=self.config.federation,
            run=self.run_id,
            round=current.number,
            model_sha256=current.model_sha256,
            selected=current.selected,
            codec=self.uplink.spec if stats is None else STATS_CODEC,
            manifest=self.uplink_manifest if stats is None else stats,
            max_samples=max_samples,
            head_stats=stats is not None,
        )

    def _reassemble(self, rnd: int, client: str, raw: bytes, current: _Round | None) -> bytes | None:
        """The whole update once its last chunk arrives (None before, or refused: a bad chunk drops its transfer)."""
        try:
            return self.reassembler.add(f"{rnd}/{client}", Chunk.decode(raw), max_bytes=self.max_update_bytes)
        except ProtocolError as exc:
            self._reject(rnd, client, "bad-chunk", f"bad chunk: {exc}", current)
            return None

    def _handle_update(self, rnd: int, client: str, raw: bytes, current: _Round | None) -> None:
        # The same checks as _accept (the round may have closed since the message was queued).
        if current is None or rnd != current.number:
            self._reject(rnd, client, "stale", f"round {rnd} is not open", current)
            return
        if client not in current.selected or client in current.updates or client in current.excluded or client in current.decoding:
            self._reject(rnd, client, "not-expected", "not selected for this round, or its update was already counted", current)
            return
        data = self._reassemble(rnd, client, raw, current)
        if data is None:
            return
        current.decoding.add(client)
        self._expect(current, client, False)
        self.intake.submit(data, rnd, client, self._expected(current, client))
        self._take(current)  # inline (no workers): counted now, as callers of _handle expect

    def _take(self, current: _Round | None, timeout: float = 0.0) -> None:
        """Count what the intake has decoded (in any order): refusals, then the nonce, then the update."""
        for decoded in self.intake.collect(timeout):
            try:
                self._take_one(decoded, current)
            except Exception as exc:  # as in _handle: counted, never stops the federation
                log.exception("decoded update of %s", decoded.client)
                self.refusals("handler-error", f"update from {decoded.client}: {type(exc).__name__}: {exc}")

    def _take_one(self, decoded: Decoded, current: _Round | None) -> None:
        rnd, client, update = decoded.round, decoded.client, decoded.update
        if current is None or rnd != current.number:
            self._reject(rnd, client, "stale", f"round {rnd} closed while its update was decoded", current)
            return
        current.decoding.discard(client)
        if decoded.refusal is not None or update is None:
            kind, reason = decoded.refusal or ("handler-error", "no update")
            self._reject(rnd, client, kind, reason, current)
            self._expect(current, client, True)  # it may send again
            return
        if update.header.nonce in current.nonces:
            self._reject(rnd, client, "replay", f"nonce {update.header.nonce} was already seen this round", current)
            self._expect(current, client, True)
            return
        current.nonces.add(update.header.nonce)
        current.updates[client] = ClientUpdate(client, update.header.num_samples, update.delta, update.nbytes, decoded.norm)
        log.info("round %d: update from %s (%d bytes, %d samples, norm %.4g)", rnd, client, update.nbytes, update.header.num_samples, decoded.norm)

    def _pump(self, seconds: float, current: _Round | None) -> None:
        """One message, then whatever the intake finished; with the intake full, no message is taken
        (they wait in the session's byte-bounded queue) until a decode finishes."""
        if self.intake.full:
            self._take(current, timeout=seconds)
            return
        msg = self._mq.get(timeout=min(seconds, 0.005) if self.intake.in_flight else seconds)
        if msg is not None:
            self._handle(msg, current)
        self._take(current)

    # ---- the loop ------------------------------------------------------------------------------
    def _wait_for_clients(self) -> tuple[str, ...]:
        need = set(self.config.expected_clients)
        deadline = time.monotonic() + self.config.wait_for_clients
        while True:
            ready = need <= self.online if need else len(self.online) >= self.config.min_clients
            if ready and len(self.online) >= self.config.min_clients:
                return tuple(sorted(need or self.online))
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(self.online)} of {self.config.min_clients} clients came online in "
                    f"{self.config.wait_for_clients:.0f}s ({sorted(self.online)}); start more agents or lower --min-clients"
                )
            self._pump(0.2, None)

    def _collect(self, current: _Round) -> None:
        self._set_open(current)
        while True:
            have = len(current.updates)
            if have and have >= len(current.selected) - len(current.excluded):  # counted and excluded are selected sites
                return
            if self.clock() > current.deadline:
                if current.decoding:  # updates that arrived in time count: finish decoding them first
                    self._take(current, timeout=0.2)
                    continue
                if have >= self.config.min_clients:
                    log.warning("round %d deadline: aggregating %d of %d updates", current.number, have, len(current.selected))
                    return
                # Re-announce: agents whose update was lost (broker restart, server crash) resend it.
                log.warning("round %d deadline with %d updates (< %d); re-announcing", current.number, have, self.config.min_clients)
                self._publish_round(current.number, current.selected)  # all of it: a restarted broker may have lost the retained chunks
                current.deadline = self.clock() + self.config.round_timeout
            self._pump(0.2, current)

    def _aggregate(self, current: _Round) -> dict[str, np.ndarray] | None:
        """The round's mean delta, if applying it leaves every weight finite. Otherwise the update
        with the largest norm is excluded (logged, counted) and the rest aggregated again; None when
        nothing is left, and the round goes on collecting."""
        while current.updates:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is what is being checked for
                mean = self.strategy.aggregate(list(current.updates.values()), list(self.uplink_manifest))
                finite = all(np.isfinite(self.state.weights[k] + v).all() for k, v in mean.items())
            if finite:
                return mean
            worst = max(current.updates.values(), key=lambda u: u.norm)
            self._reject(
                current.number,
                worst.client,
                "non-finite-aggregate",
                f"the aggregate with this update (norm {worst.norm:.4g}) is not finite; round re-run without it",
                current,
            )
            del current.updates[worst.client]
            current.excluded.add(worst.client)
        return None

    def _apply_mean(self, current: _Round) -> dict[str, float] | None:
        """A training round: the strategy's aggregate applied to the global; the round record's extra numbers."""
        mean_delta = self._aggregate(current)
        if mean_delta is None:
            return None
        if self.downlink is not None:
            # What agents reconstruct is what the server keeps: global = previous + decoded(downlink).
            self._pending_delta, mean_delta = self._global(
                current.number + 1, mean_delta, codec=self.downlink.spec, base_round=current.number, residual=self.downlink_residual
            )
        self.state.weights = W.add(self.state.weights, mean_delta)
        self.strategy.commit()  # e.g. FedAdam's moments: the aggregate was applied
        return self.strategy.round_metrics()  # e.g. dp_epsilon, dp_delta of DP-FedAvg

    def _calibrate(self, current: _Round) -> dict[str, Any]:
        """The calibration round: the sites' statistics summed (exactly: the pooled statistics), and
        the LDA head fit on the sum replaces the global's. Statistics that pass every check and still
        fit no head (fewer than 2 images in all, values that overflow) are refused and counted, and
        the final model keeps its trained head: a calibration round never stops a federation."""
        assert self.head is not None
        parts = [FeatureStats.from_tensors(u.delta) for _, u in sorted(current.updates.items())]  # type: ignore[arg-type]  # STATS_CODEC is dense
        total = sum(parts[1:], parts[0])
        images = int(total.counts.sum())
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                weight, bias = lda_head(total, self.config.head_shrinkage)
            if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
                raise ValueError("the head fit on them is not finite")
        except (ValueError, np.linalg.LinAlgError) as exc:
            self.refusals("calibration-failed", f"round {current.number}: the statistics of {', '.join(sorted(current.updates))} fit no head ({exc}); "
                          "the final model keeps its trained head")  # fmt: skip
            return {"head_calibration": False, "calibration_images": images}
        self.state.weights = self.state.weights | dict(zip(self.head, (weight, bias)))
        self._pending_delta = None  # nothing follows: the final model is published whole
        return {"head_calibration": True, "calibration_images": images}

    def _advance(self, current: _Round) -> dict[str, Any] | None:
        applied = self._calibrate(current) if self._calibrating(current.number) else self._apply_mean(current)
        if applied is None:
            return None
        self.state.round = current.number
        uplink = sum(u.nbytes for u in current.updates.values())
        record: dict[str, Any] = {
            "round": current.number,
            **self._clients_of(current),
            "uplink_bytes": int(uplink),
            "downlink_bytes": int(current.downlink_bytes * len(current.selected)),
            "rejected": len(current.rejected),
            "seconds": round(time.monotonic() - current.started, 3),
            **applied,
        }
        if self.evaluator is not None:
            record.update(self.evaluator(self.global_model()))
        self.state.history.append(record)
        self._checkpoint()
        return record

    def _clients_of(self, current: _Round) -> dict[str, Any]:
        """The round record's sites (server.fedbuff adds which version each update was trained from)."""
        return {"clients": sorted(current.updates)}

    def _session(self, transport: SessionFactory | None) -> Session:
        """With a client certificate, the broker knows the server by its certificate identity (and
        Mosquitto's use_username_as_clientid stops anyone else taking its client id)."""
        tls = None
        client_id = f"fedge-{self.config.federation}-{self.config.client_id}"
        if self.config.cert is not None:
            from fedge.identity import certificate_identity

            tls = TlsFiles(self.config.ca, self.config.cert, self.config.key)
            client_id = certificate_identity(self.config.cert)
        factory = transport or partial(MqttSession, self.config.broker)
        return factory(client_id, tls=tls, accept=self._accept, refuse=self.refusals, max_queue_bytes=self.config.max_queue_bytes)

    def run(self, transport: SessionFactory | None = None) -> RoundState:
        """Run rounds until the configured number is done; `transport` (default: MQTT to the
        configured broker) makes the session."""
        self.session = self._session(transport)
        self.session.subscribe(self.topics.all_updates, self.topics.all_status)
        self.session.connect()
        self._mq.publish(self.topics.control, b"", retain=True)  # forget a previous run's "finished"
        log.info("federation %s, run %s", self.config.federation, self.run_id)
        try:
            self._rounds()
            self._save_final()
            self._await_upload_reports(grace=2.0)
            self._publish_final()
        finally:
            self.session.close()
            self.intake.close()
            if self.refusals.total:
                log.warning("refused inputs this run, by kind: %s", json.dumps(dict(self.refusals.counts), sort_keys=True))
        return self.state

    def _rounds(self) -> None:
        """Synchronous rounds: each waits for its selected sites (or the deadline's quorum)."""
        while self.state.round < self.last_round:
            rnd = self.state.round + 1
            selected = self._wait_for_clients()
            started = time.monotonic()
            env_bytes = self._publish_round(rnd, selected)
            current = _Round(rnd, selected, self.clock() + self.config.round_timeout, started, env_bytes, W.state_sha256(self.state.weights))
            log.info("round %d announced to %s", rnd, ", ".join(selected))
            record = None
            while record is None:
                self._collect(current)
                record = self._advance(current)
            self._set_open(None)
            self._clear_round(rnd, -(-env_bytes // self.config.chunk_size))
            if self.on_round:
                self.on_round(record)

    def _await_upload_reports(self, grace: float) -> None:
        """Sites report their measured upload time just after their last update: give them a moment."""
        due = self._reports_due(self.state.history[-1]) if self.state.history else set()
        deadline = self.clock() + grace
        while self.clock() < deadline and not due <= self.uploads.keys():
            self._pump(0.1, None)

    def _reports_due(self, record: dict[str, Any]) -> set[tuple[int, str]]:
        """The (round, site) reports of a round record's sites: each reports under the round it trained."""
        return {(record["round"], client) for client in record["clients"]}

    def _save_final(self) -> Path:
        """The plain model for export: LoRA merged into the backbone, QAT fake-quant kept (as QDQ)."""
        plain = self.mode.export_model(self.global_model())
        return self.store.save_final(plain, self.mode.final_config(self.model_config), self.state.round, self.config.federation)

    def _publish_final(self) -> None:
        """Tell agents the federation is over, and leave the final model as the retained snapshot."""
        env, _ = self._global(self.state.round + 1, self.state.weights)
        transfer = self._mq.publish_chunked(self.topics.snapshot_chunk, env, chunk_size=self.config.chunk_size, retain=True)
        sha = W.state_sha256(self.state.weights)
        self._publish_record(self.topics.snapshot, SnapshotAnnouncement(round=self.state.round, model_sha256=sha, transfer=transfer, **self._signed_by()))
        self._publish_record(self.topics.control, ControlMessage(command="finished", round=self.state.round, **self._signed_by()))
