"""One MQTT session for the server and the agents (paho-mqtt 2.x, MQTT 3.1.1, QoS 1).

Persistent sessions (clean_session=False) so QoS 1 messages wait at the broker while a peer is
away; paho reconnects with exponential backoff; messages are handed to the caller's thread
through a queue so nothing heavy runs in paho's network thread.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from fedge.protocol import TransferInfo, split_chunks
from fedge.protocol.chunks import DEFAULT_CHUNK_SIZE

log = logging.getLogger(__name__)


class _Bucket(Protocol):
    def consume(self, nbytes: int) -> None: ...


class Link(Protocol):
    """Link emulation hook (fedge.linkemu.LinkEmulator): blocks to pace traffic to a profile's link."""

    uplink: _Bucket
    downlink: _Bucket


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, e.g. mqtt://127.0.0.1:1883")
        if not parsed.hostname:
            raise ValueError(f"broker URL {url!r} has no host, e.g. mqtt://127.0.0.1:1883")
        tls = parsed.scheme in ("mqtts", "ssl")
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls, parsed.username, parsed.password)


@dataclass(frozen=True)
class TlsFiles:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class MqttSession:
    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = False,
        tls: TlsFiles | None = None,
        link: Link | None = None,
        keepalive: int = 30,
    ):
        self.url = BrokerURL.parse(url)
        self.client_id = client_id
        self.link = link
        self.messages: queue.Queue[Message] = queue.Queue()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._subscriptions: list[str] = []
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._keepalive = keepalive
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=mqtt.MQTTv311
        )
        client.max_inflight_messages_set(64)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        if self.url.username:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls or tls:
            tls = tls or TlsFiles()
            client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key, cert_reqs=ssl.CERT_REQUIRED)
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # paho callbacks (network thread): keep them short
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            return
        with self._lock:
            filters = list(self._subscriptions)
        if filters:
            client.subscribe([(f, 1) for f in filters])
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code != 0:
            log.warning("%s: disconnected from broker (%s); reconnecting with backoff", self.client_id, reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.bytes_received += len(msg.payload)
        if self.link is not None:
            self.link.downlink.consume(len(msg.payload))
        self.messages.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def connect(self, timeout: float = 30.0) -> "MqttSession":
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach MQTT broker at {self.url.host}:{self.url.port} ({exc}); start one "
                        "(`mosquitto -p PORT`) or leave out --broker to use the embedded broker"
                    ) from exc
                time.sleep(0.5)
        self._client.loop_start()
        if not self._connected.wait(max(0.1, deadline - time.monotonic())):
            self._client.loop_stop()
            raise ConnectionError(f"MQTT broker at {self.url.host}:{self.url.port} did not accept the connection in {timeout:.0f}s")
        return self

    def subscribe(self, *filters: str) -> None:
        with self._lock:
            new = [f for f in filters if f not in self._subscriptions]
            self._subscriptions.extend(new)
        if new and self._connected.is_set():
            self._client.subscribe([(f, 1) for f in new])

    def unsubscribe(self, *filters: str) -> None:
        with self._lock:
            self._subscriptions = [f for f in self._subscriptions if f not in filters]
        self._client.unsubscribe(list(filters))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 120.0) -> None:
        """QoS 1 publish that rides out a broker restart: waits for the reconnect, then for the PUBACK."""
        if not self._connected.wait(timeout):
            raise ConnectionError(f"MQTT broker {self.url.host}:{self.url.port} unreachable for {timeout:.0f}s; is it running?")
        if self.link is not None and payload:
            self.link.uplink.consume(len(payload))
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.info("%s: connection dropped; %s queued until paho reconnects", self.client_id, topic)
        else:
            info.wait_for_publish(timeout)
        self.bytes_sent += len(payload)

    def publish_chunked(self, topic_for: Callable[[int], str], data: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE, retain: bool = False) -> TransferInfo:
        chunks = split_chunks(data, chunk_size)
        for chunk in chunks:
            self.publish(topic_for(chunk.index), chunk.encode(), retain=retain)
        return TransferInfo(transfer=chunks[0].transfer.hex(), chunks=len(chunks), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def get(self, timeout: float) -> Message | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self, final: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly; `final` is published first (e.g. a retained 'offline' status)."""
        if final is not None and self._connected.is_set():
            try:
                self.publish(final[0], final[1], retain=True, timeout=5)
            except (RuntimeError, ValueError) as exc:
                log.debug("final status not sent: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
