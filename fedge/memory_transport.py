"""An in-process MQTT-like broker: the agent's and the server's round logic tested without a broker
process (the integration tests keep the real Mosquitto and amqtt).

What it keeps of MQTT: topic filters with `+` and `#`, retained messages (an empty retained
publish clears one), one queue per session, a last will published when a session is dropped, and
the `accept` filter and byte-bounded queue of `MqttSession`. What it leaves out: the network.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from paho.mqtt.client import topic_matches_sub

from fedge.protocol import TransferInfo
from fedge.protocol.chunks import DEFAULT_CHUNK_SIZE
from fedge.transport import Message, publish_chunked


class MemoryBroker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: list[MemorySession] = []
        self.retained: dict[str, bytes] = {}
        self.published: list[Message] = []  # everything, in order: what a test asserts on

    def session(self, client_id: str, *, will: tuple[str, bytes] | None = None, accept: Callable[[str], str | None] | None = None,
                refuse: Callable[[str, str], None] | None = None, max_queue_bytes: int = 256 << 20, **_ignored: object) -> MemorySession:  # fmt: skip
        """A `fedge.transport.SessionFactory`: TLS and link emulation (in `_ignored`) need a network."""
        return MemorySession(self, client_id, will=will, accept=accept, refuse=refuse, max_queue_bytes=max_queue_bytes)

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            self.published.append(Message(topic, payload, retain))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            receivers = [s for s in self._sessions if s.matches(topic)]
        for session in receivers:
            session.deliver(Message(topic, payload, False))

    def attach(self, session: MemorySession) -> None:
        with self._lock:
            self._sessions.append(session)

    def detach(self, session: MemorySession) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)

    def retained_for(self, filters: list[str]) -> list[Message]:
        with self._lock:
            return [Message(t, p, True) for t, p in self.retained.items() if any(topic_matches_sub(f, t) for f in filters)]


class MemorySession:
    def __init__(self, broker: MemoryBroker, client_id: str, *, will: tuple[str, bytes] | None, accept: Callable[[str], str | None] | None,
                 refuse: Callable[[str, str], None] | None, max_queue_bytes: int) -> None:  # fmt: skip
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._accept = accept
        self._refuse = refuse or (lambda kind, detail: None)
        self._filters: list[str] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[Message] = queue.Queue()
        self._queued = 0
        self.max_queue_bytes = max_queue_bytes
        self._connected = False

    def connect(self, timeout: float = 30.0) -> MemorySession:
        self._connected = True
        self.broker.attach(self)
        return self

    def matches(self, topic: str) -> bool:
        with self._lock:
            return any(topic_matches_sub(f, topic) for f in self._filters)

    def deliver(self, msg: Message) -> None:
        if self._accept is not None and (reason := self._accept(msg.topic)) is not None:
            self._refuse("unexpected-topic", f"{msg.topic}: {reason}")
            return
        with self._lock:
            full = self._queued + len(msg.payload) > self.max_queue_bytes
            if not full:
                self._queued += len(msg.payload)
        if full:
            self._refuse("queue-full", f"{msg.topic}: {len(msg.payload)} bytes dropped")
            return
        self._queue.put(msg)

    def subscribe(self, *filters: str) -> None:
        with self._lock:
            new = [f for f in filters if f not in self._filters]
            self._filters.extend(new)
        for msg in self.broker.retained_for(new):
            self.deliver(msg)

    def unsubscribe(self, *filters: str) -> None:
        with self._lock:
            self._filters = [f for f in self._filters if f not in filters]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 120.0) -> None:
        if not self._connected:
            raise ConnectionError(f"{self.client_id}: not connected")
        self.broker.route(topic, payload, retain)

    def publish_chunked(self, topic_for: Callable[[int], str], data: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE, retain: bool = False) -> TransferInfo:
        return publish_chunked(self, topic_for, data, chunk_size=chunk_size, retain=retain)

    def get(self, timeout: float) -> Message | None:
        try:
            msg = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self._queued -= len(msg.payload)
        return msg

    @property
    def connected(self) -> bool:
        return self._connected

    def close(self, final: tuple[str, bytes] | None = None) -> None:
        if final is not None and self._connected:
            self.publish(final[0], final[1], retain=True)
        self._connected = False
        self.broker.detach(self)

    def drop(self) -> None:
        """As if the process died: the broker publishes the last will."""
        self._connected = False
        self.broker.detach(self)
        if self.will is not None:
            self.broker.route(self.will[0], self.will[1], retain=True)
