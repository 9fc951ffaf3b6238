"""Real MQTT brokers for integration tests. Use with `from brokers import mosquitto_broker`
(plain, anonymous) or `secure_mosquitto` (the `fedge provision` config: mutual TLS and ACLs)."""

from __future__ import annotations

import contextlib
import os
import pwd
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedge.broker import MosquittoProcess, free_port

if TYPE_CHECKING:
    from fedge.transport import TlsFiles


def mosquitto_binary() -> str | None:
    """The mosquitto executable (PATH, then the Debian location /usr/sbin, often off PATH), or None."""
    try:
        return MosquittoProcess.binary()
    except RuntimeError:
        return None


def _free_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A mosquitto broker on a free 127.0.0.1 port with its own config file; yields (host, port).

    Skips, with the install command, where mosquitto is missing; the process is stopped afterwards.
    """
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto binary not found on PATH or in /usr/sbin (apt-get install -y mosquitto)")
    workdir = tmp_path_factory.mktemp("mosquitto")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n", encoding="utf-8")
    with MosquittoProcess(conf, port, workdir / "mosquitto.log"):
        yield "127.0.0.1", port


@contextlib.contextmanager
def running_mosquitto(config: Path, port: int, log: Path) -> Iterator[MosquittoProcess]:
    """Run `mosquitto -c config` until the block ends; waits until it listens on 127.0.0.1:port."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found on PATH or in /usr/sbin (apt-get install -y mosquitto)")
    with MosquittoProcess(config, port, log) as proc:
        yield proc


def current_user() -> str:
    """For the generated config's `user`: Mosquitto started as root would otherwise drop to `mosquitto`,
    which cannot read a pytest temp folder."""
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass(frozen=True)
class SecureBroker:
    """A Mosquitto broker running the config `fedge provision broker` wrote, for federation `federation`."""

    host: str
    port: int
    federation: str
    provision_dir: Path  # what `fedge provision init` made: ca/, broker/, server/, sites/, federation.json
    broker_dir: Path  # what `fedge provision broker` wrote: mosquitto.conf, acl, certificates
    kits: dict[str, Path]  # site name -> its kit folder (ca.crt, NAME.crt, NAME.key, NAME-signing.key, server.pub, agent.yaml)
    log: Path

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def tls(self, identity: str) -> "TlsFiles":
        """TLS files of `server` or of a provisioned site."""
        from fedge.transport import TlsFiles

        if identity == "server":
            server = self.provision_dir / "server"
            return TlsFiles(ca=server / "ca.crt", cert=server / "server.crt", key=server / "server-tls.key")
        kit = self.kits[identity]
        return TlsFiles(ca=kit / "ca.crt", cert=kit / f"{identity}.crt", key=kit / f"{identity}.key")


@pytest.fixture(scope="module")
def secure_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """Federation "secure" with sites site-1 and site-2, provisioned into a temp folder, served by
    mosquitto on a free 127.0.0.1 port with the generated TLS + ACL config. Skips without mosquitto."""
    from server.provision import init_federation, provision_site, write_broker_config

    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found on PATH or in /usr/sbin (apt-get install -y mosquitto)")
    root = tmp_path_factory.mktemp("secure-mosquitto")
    port = _free_port()
    fed = init_federation("secure", root / "provision")
    kits = {site: provision_site(fed.dir, site, broker=f"mqtts://127.0.0.1:{port}").dir for site in ("site-1", "site-2")}
    files = write_broker_config(fed.dir, root / "broker", port=port, listen="127.0.0.1", user=current_user())
    log = root / "mosquitto.log"
    with running_mosquitto(files.config, port, log):
        yield SecureBroker("127.0.0.1", port, fed.name, fed.dir, files.dir, kits, log)


class Recorder:
    """Every message under fedge/<federation>/ as (topic, payload), from a client outside the federation
    (what an attacker on a shared broker sees)."""

    def __init__(self, broker: str, name: str, federation: str):
        from fedge.transport import MqttSession

        self.session = MqttSession(broker, name, clean_session=True)
        self.session.subscribe(f"fedge/{federation}/#")
        self.session.connect()
        self.messages: list[tuple[str, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.session.get(timeout=0.1)
            if msg is not None:
                self.messages.append((msg.topic, msg.payload))

    def wait_for(self, topic: str, timeout: float = 120.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, payload in list(self.messages):
                if t == topic and payload:
                    return payload
            time.sleep(0.05)
        raise AssertionError(f"nothing on {topic} within {timeout:.0f}s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.session.close()
