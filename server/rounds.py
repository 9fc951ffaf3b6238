"""The round state machine: announce -> collect (quorum + all selected, or deadline) -> aggregate
-> checkpoint -> announce the next round. Resumes from the last checkpoint after a restart."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compression import CodecError, ErrorFeedback, UpdateCodec
from fedge import weights as W
from fedge.checkpoint import load_checkpoint
from fedge.models import ModelConfig, build_model
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

Evaluator = Callable[[ModelConfig, dict[str, np.ndarray]], dict[str, float]]


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
        self.store = CheckpointStore(config.checkpoint_dir, config.model)
        self.strategy = get_strategy(config.strategy)
        self.uplink = UpdateCodec.from_spec(config.uplink_codec)
        self.downlink = UpdateCodec.from_spec(config.downlink_codec) if config.downlink_codec else None
        self.downlink_residual = ErrorFeedback()
        self.reassembler = Reassembler()
        self.verifier = Verifier.from_dir(config.trusted_keys) if config.trusted_keys else None
        self.signer = Signer.load(config.signing_key) if config.signing_key else None
        self.online: set[str] = set()
        self.rejections: list[tuple[int, str, str]] = []  # (round, client, reason), for operators and tests
        self.session: MqttSession | None = None
        self.state = self._initial_state()
        self.manifest = UpdateCodec.manifest(self.state.weights)

    # ---- state -------------------------------------------------------------------------------
    def _initial_state(self) -> RoundState:
        resumed = self.store.load_latest()
        if resumed is not None:
            state, record = resumed
            residual_file = record.get("downlink_residual")
            if residual_file:
                self.downlink_residual.load(self.store.folder / residual_file)
            log.warning("resuming federation %s after round %d (checkpoint in %s)", self.config.federation, state.round, self.store.folder)
            return state
        if self.config.init_checkpoint is not None:
            return RoundState(0, W.float_state(load_checkpoint(self.config.init_checkpoint).build()))
        torch.manual_seed(self.config.seed)
        return RoundState(0, W.float_state(build_model(self.config.model)))

    def _checkpoint(self) -> None:
        extra = {}
        if self.downlink is not None:
            name = "downlink_residual.safetensors"
            self.downlink_residual.save(self.store.folder / name)
            extra["downlink_residual"] = name
        self.store.save(self.state, self.config.federation, extra)

    # ---- wire ----------------------------------------------------------------------------------
    def _global_envelope(self, rnd: int, payload: bytes, codec: str, base_round: int | None) -> bytes:
        header = EnvelopeHeader(
            kind="global",
            federation=self.config.federation,
            round=rnd,
            sender=self.config.client_id,
            codec=codec,
            manifest=W.manifest_entries(self.manifest),
            base_round=base_round,
            model=json.loads(self.config.model.to_json()),
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
            train=self.config.train,
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
                manifest=self.manifest,
            )
            delta = self.uplink.decode(env.payload, self.manifest)
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
                log.warning("round %d deadline with %d updates (< %d); extending", current.number, have, self.config.min_clients)
                current.deadline = time.time() + self.config.round_timeout
            self._pump(0.2, current)

    def _advance(self, current: _Round) -> dict[str, Any]:
        mean_delta = self.strategy.aggregate(list(current.updates.values()), self.manifest)
        if self.downlink is not None:
            # What agents reconstruct is what the server keeps: global = previous + decoded(downlink).
            payload = self.downlink.encode(mean_delta, residual=self.downlink_residual, keep_dense=W.norm_stat_names(mean_delta))
            decoded = W.densify(self.downlink.decode(payload, self.manifest))
            self._pending_delta = self._global_envelope(current.number + 1, payload, self.downlink.spec, current.number)
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
            record.update(self.evaluator(self.config.model, self.state.weights))
        self.state.history.append(record)
        self._checkpoint()
        return record

    def run(self) -> RoundState:
        self._pending_delta = None
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
            self.store.save_final(self.state, self.config.federation)
            self._publish_final()
        finally:
            self.session.close()
        return self.state

    def _publish_final(self) -> None:
        """Tell agents the federation is over, and leave the final model as the retained snapshot."""
        full_codec = UpdateCodec.from_spec("fp32|zstd:1")
        env = self._global_envelope(self.state.round, full_codec.encode(self.state.weights), full_codec.spec, None)
        transfer = self.session.publish_chunked(self.topics.snapshot_chunk, env, chunk_size=self.config.chunk_size, retain=True)
        sha = W.state_sha256(self.state.weights)
        self.session.publish(self.topics.snapshot, SnapshotAnnouncement(round=self.state.round, model_sha256=sha, transfer=transfer).to_bytes(), retain=True)
        self.session.publish(self.topics.control, json.dumps({"command": "finished", "round": self.state.round}).encode(), retain=True)
