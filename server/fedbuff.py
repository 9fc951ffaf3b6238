"""Asynchronous rounds (FedBuff, Nguyen et al. 2022): a straggler does not hold the federation back.

The server keeps one open version (round number = model version). It accepts a site's update trained
from any of the last `max_staleness` + 1 versions and buffers it; once `buffer` (K) updates are ready
it aggregates them, each scaled by `staleness_weight`, with the configured strategy (same validation
and non-finite guard as synchronous rounds), checkpoints and announces the next version.

A site's updates count at most ceil(K / sites) per aggregate, the rest wait (in order) for the
next: otherwise one site, with an update trained from each version in the window (each valid alone),
could fill a buffer and make an aggregate by itself. Staleness and its weight are taken when the
update is aggregated, so one that waited counts as older.

Every check of a synchronous round still applies, per version: signature, run, the version's announced
model hash, selection, codec, sample count, nonce, and one update per site per version (counted,
never twice, also across restarts). Nothing trained from a version more than `max_staleness` behind
the open one is reassembled.

Normalisation statistics (BatchNorm running mean/var) are values, not gradients: a stale site's
statistics are rebased onto the open version before they are averaged (delta + stats of its version
- stats now), so the aggregate stays a convex mix of the sites' statistics and of the current ones.
Applied as plain deltas, a stale update's running_var delta (trained from when the variances were
larger) made variances negative and the model output NaN (measured: the first async benchmark run).

Restart: each accepted update's envelope is written to `async/` in the checkpoint folder, then
`async.json` (the commit) names it beside every open version's hash, selection and counted sites.
A restarted server re-verifies and re-decodes the buffered envelopes, so an accepted update is not
lost; `async.json` names the round it was written after (`base`), and `applying` what the aggregate
after it takes, so a crash between that aggregate's checkpoint and the next `async.json` drops what
was applied instead of applying it twice, and keeps what waits for a later aggregate. An update whose envelope was written but not yet committed by `async.json` is dropped (its
site was never counted, and the site's next version goes on as usual).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save

from compression import SparseTensor
from fedge import weights as W
from fedge.errors import check_schema_version
from fedge.files import atomic_write_bytes
from fedge.rounds import Expected
from server.config import ServerConfig
from server.intake import Decoded, decode_update
from server.rounds import Evaluator, RoundServer, _Round
from server.strategies import ClientUpdate

log = logging.getLogger("fedge.server")

ASYNC_SCHEMA_VERSION = 1


def staleness_weight(staleness: int) -> float:
    """FedBuff's polynomial staleness discount 1/sqrt(1 + staleness): a fresh update counts fully."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def scale_delta(delta: dict[str, np.ndarray | SparseTensor], weight: float) -> dict[str, np.ndarray | SparseTensor]:
    """`delta` times `weight`, sparse tensors kept sparse (the strategies sum them without densifying)."""
    w = np.float32(weight)
    return {
        k: SparseTensor(v.shape, v.indices, v.values * w) if isinstance(v, SparseTensor) else (v * w).astype(np.float32, copy=False) for k, v in delta.items()
    }


@dataclass
class _Version:
    """A version that still takes updates: what they must have been trained from, and who counted."""

    number: int
    model_sha256: str
    selected: tuple[str, ...]
    counted: set[str] = field(default_factory=set)  # accepted (buffered or applied): once per site per version
    nonces: set[str] = field(default_factory=set)
    decoding: set[str] = field(default_factory=set)
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # its normalisation statistics (rebasing stale ones)


@dataclass(frozen=True)
class _Buffered:
    version: int
    client: str
    file: str  # the envelope, under the checkpoint folder


class AsyncRoundServer(RoundServer):
    """`RoundServer` with FedBuff's buffered asynchronous aggregation (config.rounds_mode == "async")."""

    def __init__(self, config: ServerConfig, evaluator: Evaluator | None = None, on_round: Any = None, clock: Callable[[], float] = time.time):
        if config.rounds_mode != "async":
            raise ValueError("AsyncRoundServer needs rounds_mode='async'")
        super().__init__(config, evaluator, on_round, clock)
        self.versions: dict[int, _Version] = {}
        self.buffer: dict[str, tuple[_Buffered, Decoded]] = {}  # by label "<site>@<version>", in the order accepted
        self._raw: dict[tuple[int, str], bytes] = {}  # envelopes in the intake, written to disk once accepted
        # Read by paho's thread: which sites may still send chunks for which version (edited in place by the loop).
        self._window: dict[int, set[str]] = {}
        (self.store.folder / "async").mkdir(exist_ok=True)
        self._resume_async()

    # ---- persistence ---------------------------------------------------------------------------------
    @property
    def async_file(self) -> Path:
        return self.store.folder / "async.json"

    def _save_async(self, applying: list[str] | None = None) -> None:
        """The commit of the buffer and of who counted for which version; `applying`: the labels the
        aggregate after round `base` takes (kept by a crash after its checkpoint)."""
        record = {
            "schema_version": ASYNC_SCHEMA_VERSION,
            "run": self.run_id,
            "base": self.state.round,
            "applying": applying or [],
            "versions": [
                {"number": v.number, "model_sha256": v.model_sha256, "selected": list(v.selected), "counted": sorted(v.counted)} for v in self.versions.values()
            ],  # fmt: skip
            "buffer": [{"version": b.version, "client": b.client, "file": b.file} for b, _ in self.buffer.values()],
        }
        atomic_write_bytes(self.async_file, json.dumps(record, indent=1).encode())

    def _resume_async(self) -> None:
        if not self.async_file.exists():
            return
        record = json.loads(self.async_file.read_text())
        check_schema_version(record.get("schema_version"), ASYNC_SCHEMA_VERSION, str(self.async_file))
        if record.get("run") != self.run_id:
            return  # another run's (a new run.json): nothing of it counts here
        for v in record["versions"]:  # those in the window, and older ones that buffered updates were trained from
            stats_file = self._stats_file(v["number"])
            stats = load_file(str(stats_file)) if stats_file.exists() else {}
            self.versions[v["number"]] = _Version(v["number"], v["model_sha256"], tuple(v["selected"]), set(v["counted"]), stats=stats)
        applied: set[str] = set()
        if record["base"] == self.state.round - 1:  # its aggregate was checkpointed, then the server stopped before this commit
            applied = set(record["applying"])
            log.warning("async: %d buffered updates were applied before the restart: not applied again", len(applied))
        elif record["base"] != self.state.round:
            log.warning("async.json follows round %d, the checkpoint round %d: its buffer is dropped", record["base"], self.state.round)
            return
        for entry in record["buffer"]:
            item = _Buffered(entry["version"], entry["client"], entry["file"])
            if f"{item.client}@{item.version}" in applied:
                continue
            version = self.versions.get(item.version)
            path = self.store.folder / item.file
            if version is None or not path.exists():
                log.warning("async buffer: %s of version %d is gone; dropped", item.client, item.version)
                continue
            expected = self._expected_for(version, item.client)
            decoded = decode_update(path.read_bytes(), item.version, item.client, expected, self.verifier, self.config.max_update_norm)
            if decoded.update is None:
                self.refusals(*(decoded.refusal or ("handler-error", "no update")))
                continue
            self.buffer[f"{item.client}@{item.version}"] = (item, decoded)
        log.warning("resumed an async buffer of %d updates (aggregate every %d)", len(self.buffer), self.config.buffer)

    # ---- intake --------------------------------------------------------------------------------------
    def _announced(self) -> dict[str, Any]:
        return {"max_staleness": self.config.max_staleness}

    def _accept(self, topic: str) -> str | None:
        """In paho's thread: update chunks only for a version in the window, from a site not yet counted for it."""
        prefix = f"{self.topics.root}/round/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 4 or parts[1] != "update":
            return None
        sites = self._window.get(int(parts[0])) if parts[0].isdigit() and len(parts[0]) < 12 else None
        if sites is None:
            return f"version {parts[0]} takes no updates (open: {sorted(self._window)}, max staleness {self.config.max_staleness})"
        if parts[2] not in sites:
            return f"no update expected from {parts[2]!r} for version {parts[0]} (not selected, or already counted)"
        return None

    def _expected_for(self, version: _Version, client: str) -> Expected:
        max_samples = min(self.config.max_samples, self.config.site_max_samples.get(client, self.config.max_samples))
        return Expected(
            federation=self.config.federation, run=self.run_id, round=version.number, model_sha256=version.model_sha256,
            selected=version.selected, codec=self.uplink.spec, manifest=self.uplink_manifest, max_samples=max_samples,
        )  # fmt: skip

    def _version(self, rnd: int) -> _Version | None:
        """The version `rnd` if it takes updates now: in the window, and at most max_staleness behind
        the open version (state.round + 1, also between an aggregate and the next announcement)."""
        if rnd not in self._window or not 0 <= self.state.round + 1 - rnd <= self.config.max_staleness:
            return None
        return self.versions.get(rnd)

    def _handle_update(self, rnd: int, client: str, raw: bytes, current: _Round | None) -> None:
        """As RoundServer's, for any version in the window (a round that closed is not the end of its updates)."""
        version = self._version(rnd)
        if version is None:
            kind = "future" if rnd > self.state.round + 1 else "stale"
            why = "the federation finished" if self.state.round >= self.config.rounds else f"open: {self.state.round + 1}"
            self._reject(rnd, client, kind, f"version {rnd} takes no updates ({why}, max staleness {self.config.max_staleness})", current)
            return
        if client not in version.selected or client in version.counted or client in version.decoding:
            self._reject(rnd, client, "not-expected", f"not selected for version {rnd}, or its update was already counted", current)
            return
        data = self._reassemble(rnd, client, raw, current)
        if data is None:
            return
        version.decoding.add(client)
        self._window.get(rnd, set()).discard(client)
        self._raw[(rnd, client)] = data
        self.intake.submit(data, rnd, client, self._expected_for(version, client))
        self._take(current)

    def _take_one(self, decoded: Decoded, current: _Round | None) -> None:
        rnd, client, update = decoded.round, decoded.client, decoded.update
        data = self._raw.pop((rnd, client), None)
        known = self.versions.get(rnd)
        if known is not None:
            known.decoding.discard(client)
        version = self._version(rnd)
        if version is None or data is None:
            self._reject(rnd, client, "stale", f"version {rnd} left the window while its update was decoded", current)
            return
        if decoded.refusal is not None or update is None:
            self._reject(rnd, client, *(decoded.refusal or ("handler-error", "no update")), current)
            self._window.get(rnd, set()).add(client)  # it may send again
            return
        if update.header.nonce in version.nonces:
            self._reject(rnd, client, "replay", f"nonce {update.header.nonce} was already seen for version {rnd}", current)
            self._window.get(rnd, set()).add(client)
            return
        version.nonces.add(update.header.nonce)
        version.counted.add(client)
        item = _Buffered(rnd, client, f"async/{rnd:06d}_{client}.fdg")
        atomic_write_bytes(self.store.folder / item.file, data)
        self.buffer[f"{client}@{rnd}"] = (item, decoded)
        self._save_async()  # the commit: from here the update is counted and survives a restart
        log.info("version %d: update from %s trained from version %d buffered (%d in the buffer, aggregate every %d)",
                 self.state.round + 1, client, rnd, len(self.buffer), self.config.buffer)  # fmt: skip

    def _ready(self, current: _Round) -> list[str]:
        """The next aggregate's updates, in the order accepted: at most ceil(K / sites) per site (one
        site must not make an aggregate alone), at most K."""
        share = -(-self.config.buffer // max(1, len(current.selected)))
        taken: dict[str, int] = {}
        ready: list[str] = []
        for label, (item, _) in self.buffer.items():
            if taken.get(item.client, 0) < share and len(ready) < self.config.buffer:
                taken[item.client] = taken.get(item.client, 0) + 1
                ready.append(label)
        return ready

    def _stats_file(self, number: int) -> Path:
        return self.store.folder / "async" / f"stats_{number:06d}.safetensors"

    def _rebased(self, delta: dict[str, np.ndarray | SparseTensor], version: _Version) -> dict[str, np.ndarray | SparseTensor]:
        """`delta` with its normalisation statistics taken from the open version's instead of its own."""
        out = dict(delta)
        for name, base in version.stats.items():
            value = delta.get(name)
            if value is None:
                continue
            dense = value.to_dense() if isinstance(value, SparseTensor) else value
            out[name] = (dense + (base - self.state.weights[name])).astype(np.float32)
        return out

    def _weighted(self, label: str, current: _Round) -> ClientUpdate:
        """A buffered update as the strategy takes it: statistics rebased, times its staleness weight now."""
        item, decoded = self.buffer[label]
        update = decoded.update
        if update is None:
            raise ValueError("only a decoded update is buffered")
        staleness = current.number - item.version
        version = self.versions.get(item.version)
        delta = self._rebased(update.delta, version) if staleness and version is not None else update.delta
        scaled = scale_delta(delta, staleness_weight(staleness))
        return ClientUpdate(label, update.header.num_samples, scaled, update.nbytes, decoded.norm)

    def _clients_of(self, current: _Round) -> dict[str, Any]:
        """Sites by name (metrics and the dashboard count them per site), and each update's staleness
        by `<site>@<version>`."""
        trained = {label: int(label.rsplit("@", 1)[1]) for label in current.updates}
        return {"clients": sorted({label.rsplit("@", 1)[0] for label in trained}),
                "staleness": {label: current.number - version for label, version in sorted(trained.items())}}  # fmt: skip

    def _reports_due(self, record: dict[str, Any]) -> set[tuple[int, str]]:
        """A stale update's site reports under the version it trained from, not the aggregate's."""
        return {(int(version), site) for site, version in (label.rsplit("@", 1) for label in record["staleness"])}

    # ---- the loop ------------------------------------------------------------------------------------
    def _open_version(self, number: int, selected: tuple[str, ...]) -> None:
        """Version `number` opens; those older than max_staleness close (their partial uploads dropped)."""
        sha = W.state_sha256(self.state.weights)
        known = self.versions.get(number)
        if known is None or known.model_sha256 != sha:
            stats = {k: self.state.weights[k].copy() for k in W.norm_stat_names(self.state.weights)}
            self.versions[number] = _Version(number, sha, selected, stats=stats)
            atomic_write_bytes(self._stats_file(number), save(stats) if stats else save({}))
        low = number - self.config.max_staleness
        waiting = {item.version for item, _ in self.buffer.values()}  # their statistics are still needed
        for old in [v for v in self.versions if v < low]:
            self.reassembler.discard(f"{old}/")
            if old not in waiting:
                del self.versions[old]
                self._stats_file(old).unlink(missing_ok=True)
        self._window = {v.number: set(v.selected) - v.counted - v.decoding for v in self.versions.values() if v.number >= low}
        self._save_async()

    def _collect_buffer(self, current: _Round) -> None:
        while len(self._ready(current)) < self.config.buffer:
            if self.clock() > current.deadline:
                if any(v.decoding for v in self.versions.values()):
                    self._take(current, timeout=0.2)
                    continue
                # Re-announce: a restarted broker may have lost the retained global; agents resend cached updates.
                log.warning("version %d deadline with %d of %d buffered updates; re-announcing", current.number, len(self.buffer), self.config.buffer)
                self._publish_round(current.number, current.selected)
                current.deadline = self.clock() + self.config.round_timeout
            self._pump(0.2, current)

    def _rounds(self) -> None:
        while self.state.round < self.config.rounds:
            number = self.state.round + 1
            selected = self._wait_for_clients()
            started = time.monotonic()
            self._open_version(number, selected)  # before the announcement: an answer may come at once
            env_bytes = self._publish_round(number, selected)
            current = _Round(number, selected, self.clock() + self.config.round_timeout, started, env_bytes, self.versions[number].model_sha256)
            log.info("version %d announced to %s (async: aggregate every %d updates)", number, ", ".join(selected), self.config.buffer)
            record = None
            while record is None:
                self._collect_buffer(current)
                labels = self._ready(current)
                self._save_async(applying=labels)  # a crash after the checkpoint keeps what waits for the next aggregate
                current.updates = {label: self._weighted(label, current) for label in labels}
                record = self._advance(current)
                for label in [label for label in labels if label not in current.updates]:
                    del self.buffer[label]  # excluded by the non-finite guard (refused and counted there)
            files = [self.buffer.pop(label)[0].file for label in labels if label in self.buffer]
            self._save_async()  # after the checkpoint: base = this version
            for name in files:
                (self.store.folder / name).unlink(missing_ok=True)
            self._clear_round(number, -(-env_bytes // self.config.chunk_size), keep_uploads=True)
            if self.on_round:
                self.on_round(record)
        self._window = {}


def round_server(config: ServerConfig, evaluator: Evaluator | None = None, on_round: Any = None) -> RoundServer:
    """The server for `config.rounds_mode`: synchronous rounds (the default) or FedBuff."""
    if config.rounds_mode == "async":
        return AsyncRoundServer(config, evaluator, on_round)
    return RoundServer(config, evaluator, on_round)
