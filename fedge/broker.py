"""The embedded amqtt broker: a zero-setup MQTT 3.1.1 broker for `fedge demo` and local runs.

Always bound to 127.0.0.1 (amqtt's own default is 0.0.0.0). Production sites use Mosquitto;
`MosquittoProcess` runs one with a generated TLS + ACL config for `fedge demo --secure`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """amqtt in a daemon thread with its own event loop; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the embedded broker binds loopback only; for a site-wide broker run Mosquitto")
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 1000}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            broker = Broker(self._config(), loop=loop)
            self._broker = broker
            loop.run_until_complete(broker.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="fedge-embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded MQTT broker did not start on {self.url} within {timeout:.0f}s")
        if self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed to start on {self.url}: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is None or self._broker is None or not self._loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=10)
        except Exception as exc:  # a broker that will not shut down cleanly is still stopped below
            logging.getLogger(__name__).warning("embedded broker shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MosquittoProcess:
    """`mosquitto -c CONFIG` as a child process for `fedge demo --secure`; stopped on exit.

    Production sites run Mosquitto as a service with the config `fedge provision broker` writes;
    this only starts the same config for one demo."""

    CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")

    def __init__(self, config: str | os.PathLike, port: int, log: str | os.PathLike):
        self.config, self.port, self.log = Path(config), port, Path(log)
        self._proc: subprocess.Popen | None = None

    @classmethod
    def binary(cls) -> str:
        for candidate in cls.CANDIDATES:
            found = shutil.which(candidate)
            if found:
                return found
        raise RuntimeError("--secure needs the mosquitto broker: apt-get install -y mosquitto (or leave out --secure)")

    def __enter__(self) -> "MosquittoProcess":
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen([self.binary(), "-c", str(self.config)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port} in 15 s; see {self.log}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The broker's process id (benchmarks measure its memory)."""
        if self._proc is None:
            raise RuntimeError("mosquitto is not running: enter the context first")
        return self._proc.pid

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of recovery)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
