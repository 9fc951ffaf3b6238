"""Many simulated sites in one process: each a real paho MQTT client with its own connection, its
own Ed25519 key and its own signed status, reading the real signed announcements and sending real
signed update envelopes (`fedge.rounds.make_update`, chunked by `fedge.protocol`). Training is
replaced by a cheap generator: a random delta of the model's shapes, encoded by the announced
codec (top-1% q8 in the benchmark).

One thread drives every socket (paho's external-loop API: `loop_read`/`loop_write`/`loop_misc`
over a selector), so a thousand sites cost a thousand sockets, not a thousand threads. The sites of
a round are encoded first and then published together: the burst every site finishing at once
would make, which is what the server's receive path has to keep up with."""

from __future__ import annotations

import math
import selectors
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt

from fedge.protocol import ControlMessage, ProtocolError, RoundAnnouncement, StatusMessage, Topics, open_record, sign_record, split_chunks
from fedge.protocol.signing import Signer, Verifier
from fedge.rounds import make_update


@dataclass
class _Site:
    """One simulated site's connection and what it has sent (mutable: it is the site's own state)."""

    name: str
    client: mqtt.Client
    signer: Signer
    announcement: RoundAnnouncement | None = None
    sent: dict[int, bytes] = field(default_factory=dict)  # round -> envelope (resent on a re-announcement)
    answered: tuple[int, str] | None = None  # (round, issued_at) of the announcement last answered
    pending_acks: dict[int, float] = field(default_factory=dict)  # mid -> publish time
    connected: bool = False


@dataclass
class RoundTimes:
    """Per round, as the sites saw it (time.time())."""

    announced: float = math.inf  # first site that read the signed announcement
    first_publish: float = math.inf
    last_ack: float = 0.0  # the broker acknowledged the round's last update chunk
    updates: int = 0
    update_bytes: int = 0
    resent: int = 0
    encode_s: float = 0.0


def random_delta(shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What a site's training would send, minus the training: small noise in every weight (a real
    delta has no exact zeros; a mostly-zero one makes top-k's argpartition 25x slower on the ties)."""
    return {name: rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3) for name, shape in shapes.items()}


class Swarm:
    """`names` sites of federation `federation` on the plain MQTT broker at 127.0.0.1:`port`."""

    def __init__(self, port: int, federation: str, signers: Mapping[str, Signer], server_key: Verifier,
                 shapes: Mapping[str, tuple[int, ...]], seed: int = 0):  # fmt: skip
        self.port = port
        self.federation = federation
        self.topics = Topics(federation)
        self.server_key = server_key
        self.shapes = dict(shapes)
        self.rng = np.random.default_rng(seed)
        self.selector = selectors.DefaultSelector()
        self.sites = {name: self._site(name, signer) for name, signer in signers.items()}
        self.rounds: dict[int, RoundTimes] = {}
        self.finished_at: float | None = None
        self.refused = 0
        self._last_misc = 0.0
        self._deltas: list[dict[str, np.ndarray]] = []  # a few random deltas, each encoded afresh by every site using it

    def _site(self, name: str, signer: Signer) -> _Site:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fedge-{self.federation}-{name}", clean_session=False,
                             protocol=mqtt.MQTTv311)  # fmt: skip
        client.max_inflight_messages_set(64)
        site = _Site(name, client, signer)
        offline = sign_record(StatusMessage(federation=self.federation, sender=name, state="offline"), signer)
        client.will_set(self.topics.status(name), offline, qos=1, retain=True)
        client.on_connect = lambda c, u, f, rc, p: self._on_connect(site, rc)
        client.on_message = lambda c, u, msg: self._on_message(site, msg)
        client.on_publish = lambda c, u, mid, rc, p: self._on_publish(site, mid)
        return site

    # ---- paho callbacks (all in this process's one thread) ---------------------------------------
    def _on_connect(self, site: _Site, reason: mqtt.ReasonCode) -> None:
        if reason.is_failure:
            return
        site.connected = True
        site.client.subscribe([(self.topics.all_announcements, 1), (self.topics.control, 1)])
        status = StatusMessage(federation=self.federation, sender=site.name, state="online")
        site.client.publish(self.topics.status(site.name), sign_record(status, site.signer), qos=1, retain=True)

    def _on_message(self, site: _Site, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return  # a cleared retained message
        record: RoundAnnouncement | ControlMessage
        try:
            if msg.topic == self.topics.control:
                record = open_record(msg.payload, ControlMessage, self.server_key, federation=self.federation, sender="server")
                self.finished_at = self.finished_at or time.time()
                return
            record = open_record(msg.payload, RoundAnnouncement, self.server_key, federation=self.federation, sender="server")
        except ProtocolError:
            self.refused += 1
            return
        if msg.topic != self.topics.announce(record.round):
            self.refused += 1
            return
        times = self.rounds.setdefault(record.round, RoundTimes())
        times.announced = min(times.announced, time.time())
        if site.announcement is None or record.round >= site.announcement.round:
            site.announcement = record

    def _on_publish(self, site: _Site, mid: int) -> None:
        sent = site.pending_acks.pop(mid, None)
        if sent is None or site.pending_acks or site.announcement is None:
            return  # not an update chunk, or not its last
        rnd = site.announcement.round
        times = self.rounds[rnd]
        times.last_ack = max(times.last_ack, time.time())
        # As the agent does: the measured upload, in the site's signed status.
        metrics = {"upload_seconds": time.time() - sent, "upload_bytes": float(len(site.sent.get(rnd, b"")))}
        status = StatusMessage(federation=self.federation, sender=site.name, state="online", round=rnd, metrics=metrics)
        site.client.publish(self.topics.status(site.name), sign_record(status, site.signer), qos=1, retain=True)

    # ---- the loop ---------------------------------------------------------------------------------
    def connect(self, timeout: float = 300.0) -> None:
        """Open every site's connection (CONNECT sent), then drive them until all are connected."""
        for site in self.sites.values():
            site.client.connect("127.0.0.1", self.port, keepalive=120)
            sock = site.client.socket()
            if sock is None:
                raise ConnectionError(f"{site.name}: no socket after connect")
            self.selector.register(sock, selectors.EVENT_READ, site)
            self.poll(0)
        self.run_until(lambda: all(s.connected for s in self.sites.values()), timeout, "every site connected")

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            key.data.client.loop_read(max_packets=64)
        for site in self.sites.values():
            if site.client.want_write():
                site.client.loop_write()
        now = time.monotonic()
        if now - self._last_misc > 1.0:
            self._last_misc = now
            for site in self.sites.values():
                site.client.loop_misc()

    def run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout:.0f} s: {what}")
            self.poll(0.02)
            self._answer()

    def _answer(self) -> None:
        """Once every selected site holds the round's announcement: encode all, then publish all."""
        todo = [s for s in self.sites.values() if s.announcement is not None and s.answered != (s.announcement.round, s.announcement.issued_at)]
        if not todo:
            return
        ann = todo[0].announcement
        assert ann is not None
        waiting = [s for s in self.sites.values() if s.name in ann.selected and (s.announcement is None or s.announcement.round < ann.round)]
        if waiting:
            return
        times = self.rounds[ann.round]
        started = time.perf_counter()
        batch = []
        for i, site in enumerate(todo):
            a = site.announcement
            assert a is not None
            if site.name not in a.selected:
                site.answered = (a.round, a.issued_at)
                continue
            if a.round in site.sent:  # a re-announcement: the cached update again, as the agent does
                times.resent += 1
            else:
                site.sent[a.round] = make_update(
                    self._delta(i), codec=a.uplink_codec, federation=self.federation, site=site.name,
                    round=a.round, run=a.run, model_sha256=a.model_sha256, num_samples=int(self.rng.integers(50, 500)),
                    metrics={"train_loss": 0.5}, seed=i, signer=site.signer,
                )  # fmt: skip
            site.answered = (a.round, a.issued_at)
            batch.append((site, a.round))
            if i % 50 == 0:
                self.poll(0)  # keep the connections served while encoding
        times.encode_s += time.perf_counter() - started
        times.first_publish = min(times.first_publish, time.time())
        for site, rnd in batch:
            for chunk in split_chunks(site.sent[rnd], 256 * 1024):
                info = site.client.publish(self.topics.update_chunk(rnd, site.name, chunk.index), chunk.encode(), qos=1)
                site.pending_acks[info.mid] = time.time()
            times.updates += 1
            times.update_bytes += len(site.sent[rnd])
            site.sent = {rnd: site.sent[rnd]}  # only the current round's update is kept
            if site.client.want_write():
                site.client.loop_write()

    def _delta(self, i: int, pool: int = 8) -> dict[str, np.ndarray]:
        while len(self._deltas) < pool:
            self._deltas.append(random_delta(self.shapes, self.rng))
        return self._deltas[(i + int(self.rng.integers(pool))) % pool]

    def close(self) -> None:
        for site in self.sites.values():
            site.client.disconnect()
            site.client.loop_write()
            sock = site.client.socket()
            if sock is not None:
                self.selector.unregister(sock)
        self.selector.close()
