"""The `/metrics` HTTP endpoint both the server and the agent serve (Prometheus text format)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


class MetricsEndpoint:
    """Serves `registry` on http://HOST:PORT/metrics (port 0: a free one) from a daemon thread.
    HOST defaults to loopback: exposing metrics to the network is the operator's choice."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
        from prometheus_client import start_http_server

        if not 0 <= port <= 65535:
            raise ValueError(f"--metrics-port must be 0..65535, not {port}")
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._httpd.server_port)

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
