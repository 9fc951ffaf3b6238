"""The round state machine: announce -> collect (quorum + all selected, or deadline) -> aggregate
-> checkpoint -> announce the next round. Resumes from the last checkpoint after a restart."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compression import CodecError, ErrorFeedback, UpdateCodec
from fedge import weights as W
from fedge.files import atomic_write_bytes
from fedge.models import ModelConfig, build_model
from fedge.modes import get_mode, init_from_checkpoint
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
from fedge.transport import Message, MqttSession
from server.config import ServerConfig
from server.store import CheckpointStore, RoundState
from server.strategies import ClientUpdate, get_strategy
from server.validation import RejectedUpdate, validate_header

log = logging.getLogger("fedge.server")

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class _Round:
    number: int
    selected: tuple[str, ...]
    deadline: float
    started: float
    downlink_bytes: int
    updates: dict[str, ClientUpdate] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)


class RoundServer:
    def __init__(self, config: ServerConfig, evaluator: Evaluator | None = None, on_round: Callable[[dict[str, Any]], None] | None = None):
        self.config = config
        self.topics = Topics(config.federation)
        self.evaluator = evaluator
        self.on_round = on_round
        self.mode = get_mode(config.mode, **config.mode_options)
        self.model_config, template = self._initial_model()
        self.template = template
        self.store = CheckpointStore(config.checkpoint_dir, self.model_config, template, self.mode.name, config.dataset)
        self.strategy = get_strategy(config.strategy)
        self.uplink = UpdateCodec.from_spec(config.uplink_codec)
        self.downlink = UpdateCodec.from_spec(config.downlink_codec) if config.downlink_codec else None
        self.downlink_residual = ErrorFeedback()
        self._pending_delta: bytes | None = None  # next round's downlink delta envelope (lost on restart: full then)
        self.reassembler = Reassembler()
        self.verifier = Verifier.from_dir(config.trusted_keys) if config.trusted_keys else None
        self.signer = Signer.load(config.signing_key) if config.signing_key else None
        self.online: set[str] = set()
        self.rejections: list[tuple[int, str, str]] = []  # (round, client, reason), for operators and tests
        self.uploads: dict[tuple[int, str], dict[str, float]] = {}  # sites' measured upload time and bytes
        self.session: MqttSession | None = None
        self.state = self._initial_state()
        self.manifest = UpdateCodec.manifest(self.state.weights)
        # What travels up (and as downlink deltas): the mode's trainable tensors only, e.g. LoRA adapters + head.
        trainable = self.mode.trainable_state(template)
        self.uplink_manifest = [t for t in self.manifest if t.name in trainable]

    # ---- state -------------------------------------------------------------------------------
    def _initial_model(self) -> tuple[ModelConfig, torch.nn.Module]:
        """The training-time global model: seeded or pretrained, pruned once by the server in `pruned` mode."""
        torch.manual_seed(self.config.seed)
        config = self.config.model
        if self.config.init_checkpoint is not None:
            model, config = init_from_checkpoint(
                str(self.config.init_checkpoint), in_channels=config.in_channels, num_classes=config.num_classes,
                image_size=config.image_size, dataset=self.config.dataset,
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
            residual_file = record.get("downlink_residual")
            if residual_file:
                path = self.store.folder / residual_file
                self.downlink_residual.load_bytes(path.read_bytes(), str(path))
            log.warning("resuming federation %s after round %d (checkpoint in %s)", self.config.federation, state.round, self.store.folder)
            return state
        return RoundState(0, W.float_state(self.template))

    def global_model(self) -> torch.nn.Module:
        """The current global as a training-time module (what the evaluator scores)."""
        W.load_float_state(self.template, self.state.weights)
        return self.template

    def _checkpoint(self) -> None:
        extra = {}
        if self.downlink is not None:
            name = "downlink_residual.safetensors"
            atomic_write_bytes(self.store.folder / name, self.downlink_residual.to_bytes())
            extra["downlink_residual"] = name
        self.store.save(self.state, self.config.federation, extra)

    # ---- wire ----------------------------------------------------------------------------------
    def _global_envelope(self, rnd: int, payload: bytes, codec: str, base_round: int | None, manifest: list | None = None) -> bytes:
        header = EnvelopeHeader(
            kind="global",
            federation=self.config.federation,
            round=rnd,
            sender=self.config.client_id,
            codec=codec,
            manifest=W.manifest_entries(manifest or self.manifest),
            base_round=base_round,
            model=json.loads(self.model_config.to_json()),
        )
        return encode_envelope(header, payload, self.signer)

    def _publish_round(self, rnd: int, selected: tuple[str, ...]) -> int:
        """Publish round r's global (delta from r-1 when a downlink codec is set) and the snapshot."""
        previous = self.state.weights
        full_codec = UpdateCodec.from_spec("fp32|zstd:1")
        snapshot_env = self._global_envelope(rnd, full_codec.encode(previous), full_codec.spec, None)
        snapshot = self.session.publish_chunked(self.topics.snapshot_chunk, snapshot_env, chunk_size=self.config.chunk_size, retain=True)
        sha = W.state_sha256(previous)
        self.session.publish(self.topics.snapshot, SnapshotAnnouncement(round=rnd - 1, model_sha256=sha, transfer=snapshot).to_bytes(), retain=True)
        if self._pending_delta is not None and rnd > 1:
            env, kind, base = self._pending_delta, "delta", rnd - 1
        else:
            env, kind, base = snapshot_env, "full", None
        transfer = self.session.publish_chunked(lambda i: self.topics.global_chunk(rnd, i), env, chunk_size=self.config.chunk_size, retain=True)
        announcement = RoundAnnouncement(
            round=rnd,
            deadline=time.time() + self.config.round_timeout,
            selected=selected,
            model_sha256=sha,
            downlink=transfer,
            downlink_kind=kind,
            base_round=base,
            uplink_codec=self.uplink.spec,
            train={**self.config.train, "mode": self.mode.name, "mode_options": self.config.mode_options},
        )
        self.session.publish(self.topics.announce(rnd), announcement.to_bytes(), retain=True)
        return len(env)

    def _clear_round(self, rnd: int, chunks: int) -> None:
        """Drop a finished round's retained messages so late subscribers do not fetch stale data."""
        for i in range(chunks):
            self.session.publish(self.topics.global_chunk(rnd, i), b"", retain=True)
        self.session.publish(self.topics.announce(rnd), b"", retain=True)
        self.reassembler.discard(f"{rnd}/")

    # ---- message handling ----------------------------------------------------------------------
    def _handle(self, msg: Message, current: _Round | None) -> None:
        try:
            info = self.topics.parse(msg.topic)
        except ValueError as exc:
            log.warning("ignored message: %s", exc)
            return
        if info.kind == "status":
            try:
                status = StatusMessage.from_bytes(msg.payload)
            except ValueError:
                log.warning("ignored malformed status on %s", msg.topic)
                return
            (self.online.add if status.state != "offline" else self.online.discard)(info.client)
            if status.round is not None and "upload_seconds" in status.metrics:
                self.uploads[(status.round, info.client)] = status.metrics
            return
        if info.kind != "update":
            return
        self._handle_update(info.round, info.client, msg.payload, current)

    def _reject(self, rnd: int, client: str, reason: str, current: _Round | None) -> None:
        log.warning("rejected update from %s for round %s: %s", client, rnd, reason)
        self.rejections.append((rnd, client, reason))
        if current is not None:
            current.rejected.append(f"{client}: {reason}")

    def _handle_update(self, rnd: int, client: str, raw: bytes, current: _Round | None) -> None:
        if current is None or rnd != current.number:
            self._reject(rnd, client, f"round {rnd} is not open", current)
            return
        try:
            data = self.reassembler.add(f"{rnd}/{client}", Chunk.decode(raw))
        except ProtocolError as exc:
            self._reject(rnd, client, f"bad chunk: {exc}", current)
            return
        if data is None:
            return
        if client in current.updates:
            log.info("duplicate update from %s for round %d ignored", client, rnd)
            return
        try:
            env = decode_envelope(data, self.verifier)
            validate_header(
                env.header,
                topic_client=client,
                federation=self.config.federation,
                current_round=rnd,
                selected=current.selected,
                codec=self.uplink.spec,
                manifest=self.uplink_manifest,
            )
            delta = self.uplink.decode(env.payload, self.uplink_manifest)
        except (ProtocolError, RejectedUpdate, CodecError) as exc:
            self._reject(rnd, client, str(exc), current)
            return
        current.updates[client] = ClientUpdate(client, env.header.num_samples, delta, len(data))
        log.info("round %d: update from %s (%d bytes, %d samples)", rnd, client, len(data), env.header.num_samples)

    def _pump(self, seconds: float, current: _Round | None) -> None:
        msg = self.session.get(timeout=seconds)
        if msg is not None:
            self._handle(msg, current)

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
        while True:
            have = len(current.updates)
            if set(current.selected) <= set(current.updates):
                return
            if time.time() > current.deadline:
                if have >= self.config.min_clients:
                    log.warning("round %d deadline: aggregating %d of %d updates", current.number, have, len(current.selected))
                    return
                # Re-announce: agents whose update was lost (broker restart, server crash) resend it.
                log.warning("round %d deadline with %d updates (< %d); re-announcing", current.number, have, self.config.min_clients)
                self._publish_round(current.number, current.selected)  # all of it: a restarted broker may have lost the retained chunks
                current.deadline = time.time() + self.config.round_timeout
            self._pump(0.2, current)

    def _advance(self, current: _Round) -> dict[str, Any]:
        mean_delta = self.strategy.aggregate(list(current.updates.values()), self.uplink_manifest)
        if self.downlink is not None:
            # What agents reconstruct is what the server keeps: global = previous + decoded(downlink).
            payload = self.downlink.encode(mean_delta, residual=self.downlink_residual, keep_dense=W.norm_stat_names(mean_delta))
            decoded = W.densify(self.downlink.decode(payload, self.uplink_manifest))
            self._pending_delta = self._global_envelope(current.number + 1, payload, self.downlink.spec, current.number, self.uplink_manifest)
            mean_delta = decoded
        self.state.weights = W.add(self.state.weights, mean_delta)
        self.state.round = current.number
        uplink = sum(u.nbytes for u in current.updates.values())
        record: dict[str, Any] = {
            "round": current.number,
            "clients": sorted(current.updates),
            "uplink_bytes": int(uplink),
            "downlink_bytes": int(current.downlink_bytes * len(current.selected)),
            "rejected": len(current.rejected),
            "seconds": round(time.monotonic() - current.started, 3),
        }
        if self.evaluator is not None:
            record.update(self.evaluator(self.global_model()))
        self.state.history.append(record)
        self._checkpoint()
        return record

    def run(self) -> RoundState:
        self.session = MqttSession(self.config.broker, f"fedge-{self.config.federation}-{self.config.client_id}")
        self.session.subscribe(self.topics.all_updates, self.topics.all_status)
        self.session.connect()
        self.session.publish(self.topics.control, b"", retain=True)  # forget a previous run's "finished"
        try:
            while self.state.round < self.config.rounds:
                rnd = self.state.round + 1
                selected = self._wait_for_clients()
                started = time.monotonic()
                env_bytes = self._publish_round(rnd, selected)
                current = _Round(rnd, selected, time.time() + self.config.round_timeout, started, env_bytes)
                log.info("round %d announced to %s", rnd, ", ".join(selected))
                self._collect(current)
                record = self._advance(current)
                self._clear_round(rnd, -(-env_bytes // self.config.chunk_size))
                if self.on_round:
                    self.on_round(record)
            self._save_final()
            self._await_upload_reports(grace=2.0)
            self._publish_final()
        finally:
            self.session.close()
        return self.state

    def _await_upload_reports(self, grace: float) -> None:
        """Sites report their measured upload time just after their last update: give them a moment."""
        last = self.state.history[-1] if self.state.history else None
        deadline = time.monotonic() + grace
        while last and time.monotonic() < deadline and any((last["round"], c) not in self.uploads for c in last["clients"]):
            self._pump(0.1, None)

    def _save_final(self) -> Path:
        """The plain model for export: LoRA merged into the backbone, QAT fake-quant kept (as QDQ)."""
        plain = self.mode.export_model(self.global_model())
        config = self.model_config
        if self.mode.name == "qat":
            config = config.replace(options={**config.options, "qat": {"momentum": self.mode.momentum}})
        return self.store.save_final(plain, config, self.state.round, self.config.federation)

    def _publish_final(self) -> None:
        """Tell agents the federation is over, and leave the final model as the retained snapshot."""
        full_codec = UpdateCodec.from_spec("fp32|zstd:1")
        env = self._global_envelope(self.state.round, full_codec.encode(self.state.weights), full_codec.spec, None)
        transfer = self.session.publish_chunked(self.topics.snapshot_chunk, env, chunk_size=self.config.chunk_size, retain=True)
        sha = W.state_sha256(self.state.weights)
        self.session.publish(self.topics.snapshot, SnapshotAnnouncement(round=self.state.round, model_sha256=sha, transfer=transfer).to_bytes(), retain=True)
        self.session.publish(self.topics.control, json.dumps({"command": "finished", "round": self.state.round}).encode(), retain=True)
