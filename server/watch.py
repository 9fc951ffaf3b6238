"""Everything an operator can switch on around a running `RoundServer`: Prometheus metrics, the live
dashboard and experiment tracking, started before its round loop and stopped after it
(`fedge server` and `fedge demo` both call `watched`). Each part imports its libraries only when on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.rounds import RoundServer
    from server.tracking import Tracker

log = logging.getLogger("fedge.server")


@dataclass(frozen=True)
class WatchSettings:
    metrics_port: int | None = None  # /metrics on metrics_host:metrics_port; 0: a free port
    metrics_host: str = "127.0.0.1"
    dashboard: str | None = None  # HOST:PORT or PORT (host 127.0.0.1)
    dashboard_token: str | None = None
    mlflow: str | None = None  # tracking URL, or a folder (MLflow's file store)
    tensorboard: Path | None = None  # folder for TensorBoard event files
    linger: float = 0.0  # seconds the dashboard and metrics stay up after the last round

    def __post_init__(self) -> None:
        if not 0 <= self.linger <= 86400:
            raise ValueError(f"--linger must be 0..86400 seconds, not {self.linger}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be 0..65535, not {self.metrics_port}")
        from server.dashboard.options import check_token, parse_address

        if self.dashboard is not None:
            parse_address(self.dashboard)
        if self.dashboard_token is not None:
            if self.dashboard is None:
                raise ValueError("--dashboard-token protects the dashboard: give --dashboard HOST:PORT too")
            check_token(self.dashboard_token)
        for tracker in self._tracker_classes():
            tracker.check()

    def _tracker_classes(self) -> list[type[Tracker]]:
        from server.tracking import MlflowTracker, TensorBoardTracker

        return [cls for cls, on in ((MlflowTracker, self.mlflow), (TensorBoardTracker, self.tensorboard)) if on]

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.metrics_port, self.dashboard, self.mlflow, self.tensorboard))

    def trackers(self, federation: str) -> list[Tracker]:
        from server.tracking import MlflowTracker, TensorBoardTracker

        found: list[Tracker] = []
        if self.mlflow:
            found.append(MlflowTracker(self.mlflow, experiment=federation))
        if self.tensorboard:
            found.append(TensorBoardTracker(self.tensorboard))
        return found


@contextmanager
def watched(server: RoundServer, settings: WatchSettings, say: Callable[[str], None] = log.warning) -> Iterator[None]:
    """Serve what `settings` switch on for `server` while the block runs (its `run()`); `say` gets
    the addresses (the CLI prints them)."""
    with ExitStack() as stack:
        if settings.metrics_port is not None:
            from server.metrics import ServerMetrics

            endpoint = stack.enter_context(ServerMetrics(server).serve(settings.metrics_port, settings.metrics_host))
            say(f"Prometheus metrics on {endpoint.url}")
        if settings.dashboard is not None:
            from server.dashboard import serve_dashboard

            dashboard = stack.enter_context(serve_dashboard(server, settings.dashboard, settings.dashboard_token))
            say(f"dashboard on {dashboard.url}" + (" (bearer token required)" if settings.dashboard_token else ""))
        trackers = settings.trackers(server.config.federation)
        if trackers:
            from server.tracking import tracking

            stack.enter_context(tracking(server, trackers))
            say("tracking rounds in " + ", ".join(t.name for t in trackers))
        yield
        if settings.linger and (settings.metrics_port is not None or settings.dashboard is not None):
            # The last round's numbers must reach a scrape (Prometheus asks every 15 s or so) and open pages.
            say(f"federation finished: the dashboard and metrics stay up {settings.linger:g} s (--linger)")
            time.sleep(settings.linger)
