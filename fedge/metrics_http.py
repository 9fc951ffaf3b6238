"""The `/metrics` HTTP endpoint both the server and the agent serve (Prometheus text format)."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

POLL_SECONDS = 0.05  # how soon close() returns (http.server's default of 0.5 s is added to every run's end)


class MetricsEndpoint:
    """Serves `registry` on http://HOST:PORT/metrics (port 0: a free one) from a daemon thread.
    HOST defaults to loopback: exposing metrics to the network is the operator's choice."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
        from http.server import ThreadingHTTPServer

        from prometheus_client.exposition import MetricsHandler

        if not 0 <= port <= 65535:
            raise ValueError(f"--metrics-port must be 0..65535, not {port}")

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._httpd = Server((host, port), MetricsHandler.factory(registry))
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(POLL_SECONDS,), name="fedge-metrics", daemon=True)
        self._thread.start()
        self.host = host
        self.port = int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
