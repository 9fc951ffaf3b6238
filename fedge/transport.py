"""One MQTT session for the server and the agents (paho-mqtt 2.x, MQTT 3.1.1, QoS 1).

`Session` is what the agent and the server need of a transport; `MqttSession` is the real one and
`fedge.memory_transport.MemoryBroker` an in-process one, so their round logic is unit-tested
without a broker process.

Persistent sessions (clean_session=False) so QoS 1 messages wait at the broker while a peer is
away; paho reconnects with exponential backoff; messages are handed to the caller's thread
through a queue so nothing heavy runs in paho's network thread (except link emulation, which
must pace the network itself, and the `accept` topic filter, which is a few string compares).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
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
    def consume(self, nbytes: int) -> object: ...


class Link(Protocol):
    """Link emulation hook (fedge.linkemu.LinkEmulator): blocks to pace traffic to a profile's link."""

    @property
    def uplink(self) -> _Bucket: ...
    @property
    def downlink(self) -> _Bucket: ...


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
    """PEM files for mutual TLS: the CA that signed the broker's certificate (None: the system's CAs),
    and this client's certificate and key (from a `fedge provision` kit)."""

    ca: str | os.PathLike[str] | None = None
    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None

    def check(self) -> None:
        """ValueError naming the file and the fix, before any connection is tried."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS client certificate and key go together: pass both --cert and --key (NAME.crt and NAME.key of the kit)")
        for what, path in (("CA certificate (--ca)", self.ca), ("client certificate (--cert)", self.cert), ("client key (--key)", self.key)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{what} {os.fspath(path)} does not exist; it comes from `fedge provision` (the site's kit)")


_TLS_ERROR = re.compile(r"ssl|tls|certificate|EOF occurred in violation of protocol", re.IGNORECASE)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class Session(Protocol):
    """A connected MQTT-like session: QoS 1 publish/subscribe with retained messages."""

    def connect(self, timeout: float = 30.0) -> "Session": ...
    def subscribe(self, *filters: str) -> None: ...
    def unsubscribe(self, *filters: str) -> None: ...
    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 120.0) -> None: ...
    def publish_chunked(self, topic_for: Callable[[int], str], data: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE, retain: bool = False) -> TransferInfo: ...
    def get(self, timeout: float) -> Message | None: ...
    def close(self, final: tuple[str, bytes] | None = None) -> None: ...
    @property
    def connected(self) -> bool: ...


class SessionFactory(Protocol):
    """Makes the session of one client: `MqttSession` bound to a broker URL, or `MemoryBroker.session`."""

    def __call__(
        self,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        tls: "TlsFiles | None" = None,
        link: "Link | None" = None,
        accept: Callable[[str], str | None] | None = None,
        refuse: Callable[[str, str], None] | None = None,
        max_queue_bytes: int = 256 << 20,
    ) -> Session: ...


def publish_chunked(session: Session, topic_for: Callable[[int], str], data: bytes, *, chunk_size: int, retain: bool) -> TransferInfo:
    """Split `data` into chunks, publish each on `topic_for(index)`, and say how to find and check it."""
    chunks = split_chunks(data, chunk_size)
    for chunk in chunks:
        session.publish(topic_for(chunk.index), chunk.encode(), retain=retain)
    return TransferInfo(transfer=chunks[0].transfer.hex(), chunks=len(chunks), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


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
        accept: Callable[[str], str | None] | None = None,
        refuse: Callable[[str, str], None] | None = None,
        max_queue_bytes: int = 256 << 20,
    ):
        """`accept(topic)` runs in paho's thread before a message is queued and returns why to drop
        it (or None): what nobody expects never reaches memory beyond paho's own buffer. The queue
        is bounded by bytes; a drop is reported to `refuse(kind, detail)`."""
        self.url = BrokerURL.parse(url)
        self.client_id = client_id
        self.link = link
        self.messages: queue.Queue[Message] = queue.Queue()
        self._accept = accept
        self._refuse = refuse or (lambda kind, detail: log.warning("%s: dropped (%s): %s", client_id, kind, detail))
        self.max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self.bytes_sent = 0
        self._subscriptions: list[str] = []
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._keepalive = keepalive
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=mqtt.MQTTv311)
        client.max_inflight_messages_set(64)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        if self.url.username:
            client.username_pw_set(self.url.username, self.url.password)
        self._tls = (tls or TlsFiles()) if (self.url.tls or tls) else None
        if self._tls is not None:
            self._tls.check()
            ca, cert, key = (None if p is None else os.fspath(p) for p in (self._tls.ca, self._tls.cert, self._tls.key))
            try:
                client.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"cannot load TLS files (ca={ca}, cert={cert}, key={key}): {exc}; the certificate and key must be "
                    "a matching PEM pair from the same `fedge provision` kit"
                ) from None
        # Why the broker turned us away before the first CONNACK (a TLS alert, a refused CONNACK).
        self._last_error: str | None = None
        self._refusal: str | None = None
        self._ever_connected = False
        client.on_log = self._on_log
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # paho callbacks (network thread): keep them short
    def _on_log(self, client, userdata, level, buf) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = buf

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            if not self._ever_connected:
                self._refusal = f"the broker answered CONNECT with '{reason_code}'"
            return
        self._ever_connected = True
        with self._lock:
            filters = list(self._subscriptions)
        if filters:
            client.subscribe([(f, 1) for f in filters])
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._ever_connected and self._refusal is None and self._last_error and _TLS_ERROR.search(self._last_error):
            self._refusal = self._last_error  # the broker ended the TLS handshake: retrying will not help
        if self._refusal is not None and not self._ever_connected:
            log.debug("%s: refused by the broker: %s", self.client_id, self._refusal)
        elif reason_code != 0:
            log.warning("%s: disconnected from broker (%s); reconnecting with backoff", self.client_id, reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self.link is not None:
            self.link.downlink.consume(len(msg.payload))
        if self._accept is not None:
            reason = self._accept(msg.topic)
            if reason is not None:
                self._refuse("unexpected-topic", f"{msg.topic}: {reason}")
                return
        size = len(msg.payload)
        with self._lock:
            if self._queued_bytes + size > self.max_queue_bytes:
                full = True
            else:
                full = False
                self._queued_bytes += size
        if full:
            self._refuse("queue-full", f"{msg.topic}: {size} bytes dropped, {self._queued_bytes} bytes already queued")
            return
        self.messages.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def connect(self, timeout: float = 30.0) -> "MqttSession":
        """Connect, retrying an unreachable broker until `timeout`; a broker that refuses us (TLS handshake
        or CONNACK) raises ConnectionError at once, naming the cause and the fix."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive)
                break
            except ssl.SSLError as exc:  # the handshake failed: no retry will change that
                raise ConnectionError(self._refused_message(str(exc))) from None
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach MQTT broker at {self.url.host}:{self.url.port} ({exc}); start one "
                        "(`mosquitto -p PORT`) or leave out --broker to use the embedded broker"
                    ) from exc
                time.sleep(0.5)
        self._client.loop_start()
        while not self._connected.wait(0.05):
            if self._refusal is not None or time.monotonic() > deadline:
                self._client.disconnect()
                self._client.loop_stop()
                if self._refusal is not None:
                    raise ConnectionError(self._refused_message(self._refusal))
                last = f" (last error: {self._last_error})" if self._last_error else ""
                if self._tls is None and self._last_error and "reset" in self._last_error:
                    last += "; if it is a TLS listener (port 8883), use mqtts:// with --ca/--cert/--key"
                raise ConnectionError(f"MQTT broker at {self.url.host}:{self.url.port} did not accept the connection in {timeout:.0f}s{last}")
        return self

    def _refused_message(self, cause: str) -> str:
        """Why the broker (or our own TLS check of it) turned this client away, and what to do about it."""
        where = f"MQTT broker at {self.url.host}:{self.url.port} refused {self.client_id!r}: {cause}"
        text = cause.lower()
        has_cert = self._tls is not None and self._tls.cert is not None
        if "certificate_verify_failed" in text:  # our check of the broker's certificate
            if "hostname" in text or "ip address mismatch" in text:
                fix = (
                    "the broker's certificate does not name this host; connect with a name it holds (localhost, "
                    "127.0.0.1 or a --host given to `fedge provision init`), or re-provision with --host"
                )
            else:
                fix = (
                    "cannot verify the broker's certificate: pass --ca with the federation's ca.crt "
                    "(in the site's kit, or the server folder of `fedge provision init`)"
                )
        elif self._tls is None and ("CONNECT" in cause and ("authoriz" in text or "password" in text)):
            fix = "the broker wants credentials: use mqtts:// with --ca/--cert/--key from a `fedge provision site` kit, or a username and password in the URL"
        elif not has_cert and ("certificate required" in text or "eof occurred" in text or "handshake failure" in text):
            fix = "the broker requires a client certificate: pass --cert and --key from this site's `fedge provision site` kit"
        elif "unknown ca" in text or "bad certificate" in text or "decrypt error" in text:
            fix = (
                "the broker does not trust this client certificate (issued by another federation's CA?): "
                "use the kit that `fedge provision site NAME` made for this federation"
            )
        elif "expired" in text:
            fix = "a certificate has expired: issue a new kit with `fedge provision site NAME --dir DIR --force`"
        elif "revoked" in text:
            fix = "this certificate was revoked: ask the federation operator for a new kit"
        elif "eof occurred" in text:  # TLS 1.3: the broker may close before its alert is read
            fix = (
                "the broker closed the TLS handshake, so it did not accept this client certificate (another CA's, "
                "expired, or not a client certificate); use the kit `fedge provision site NAME` made for this federation"
            )
        elif "unsupported certificate" in text:
            fix = "this certificate may not be used by a client (it is the broker's?): use the site's NAME.crt and NAME.key"
        elif "authoriz" in text or "password" in text:
            fix = "the broker does not accept this identity: check its ACL/password file and the certificate's name"
        else:
            fix = "check the broker's log for the reason (mosquitto logs every refused connection)"
        return f"{where}; {fix}"

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
        return publish_chunked(self, topic_for, data, chunk_size=chunk_size, retain=retain)

    def get(self, timeout: float) -> Message | None:
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self._queued_bytes -= len(msg.payload)
        return msg

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
