"""Real MQTT brokers for integration tests. Use with `from brokers import mosquitto_broker`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mosquitto_binary() -> str | None:
    """The mosquitto executable, looked up on PATH and in the Debian location (/usr/sbin is often off PATH)."""
    for candidate in _MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port} within {timeout}s: {log.read_text(errors='replace')}")


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
    log = workdir / "mosquitto.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc, port, log)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
