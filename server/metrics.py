"""What an operator sees of a running federation: one read-only view of the server's state
(`FederationView`), the Prometheus metrics computed from it, and the HTTP endpoint that serves them.

The server is not changed: the view reads `RoundServer`'s public attributes (history, online sites,
upload reports, refusals, checkpoint folder), and `ServerMetrics.attach` wraps its `on_round` callback
and its strategy (to time aggregation). Every server gets its own `CollectorRegistry`, so two servers
in one process (tests, simulations) never share a metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedge.metrics_http import MetricsEndpoint

if TYPE_CHECKING:
    from server.rounds import RoundServer
    from server.strategies import Strategy

# Round records carry these numbers (anything else an evaluator adds stays off the operator's view).
EVALUATED = ("auc", "accuracy", "psnr", "ssim")  # every task's headline metrics (fedge.tasks.base.HEADLINE), as evaluators return them
RECORD_NUMBERS = ("round", "uplink_bytes", "downlink_bytes", "rejected", "seconds", *EVALUATED)
ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DETAIL_CHARS = 200  # a refusal's detail, as shown: names and reasons, cut short


def _copy(read: Callable[[], Any], tries: int = 5) -> Any:
    """A copy of a container another thread may be changing (paho's thread counts refusals)."""
    for _ in range(tries - 1):
        try:
            return read()
        except RuntimeError:  # changed size during iteration
            time.sleep(0.001)
    return read()


@dataclass(frozen=True)
class SiteView:
    site: str
    online: bool
    last_round: int | None  # the last round whose aggregate counted this site's update
    updates: int  # updates that counted
    upload_bytes: int  # what the site reported sending (its signed status after each upload)
    upload_seconds: float  # the site's measured upload time, summed
    last_upload_seconds: float | None


@dataclass(frozen=True)
class FederationView:
    """A consistent copy of what the server knows, taken at one moment from any thread."""

    federation: str
    run: str
    round: int  # the last completed round
    rounds: int  # the configured number of rounds
    running: bool
    history: tuple[dict[str, Any], ...]
    online: frozenset[str]
    sites: tuple[SiteView, ...]
    refusals: dict[str, int]
    recent_refusals: tuple[tuple[str, str], ...]  # newest last

    @classmethod
    def of(cls, server: RoundServer) -> FederationView:
        history = tuple(dict(r) for r in _copy(lambda: list(server.state.history)))
        online = frozenset(_copy(lambda: set(server.online)))
        uploads = _copy(lambda: dict(server.uploads))
        refusals = _copy(lambda: dict(server.refusals.counts))
        recent = tuple(_copy(lambda: list(server.refusals.recent))[-50:])
        names = set(server.config.expected_clients) | online | {site for _, site in uploads}
        for record in history:
            names.update(record.get("clients", ()))
        sites = []
        for name in sorted(names):
            counted = [r["round"] for r in history if name in r.get("clients", ())]
            reports = [m for (_, site), m in sorted(uploads.items()) if site == name]
            sites.append(SiteView(
                site=name, online=name in online, last_round=max(counted) if counted else None, updates=len(counted),
                upload_bytes=int(sum(m.get("upload_bytes", 0) for m in reports)),
                upload_seconds=float(sum(m.get("upload_seconds", 0) for m in reports)),
                last_upload_seconds=float(reports[-1]["upload_seconds"]) if reports else None,
            ))  # fmt: skip
        # The last round in the history, not state.round: the server sets that before it evaluates
        # and records the round, and a view between the two would be "finished" with a round missing.
        state_round = int(history[-1]["round"]) if history else 0
        return cls(
            federation=server.config.federation, run=server.run_id, round=state_round, rounds=server.last_round,
            running=server.session is not None and state_round < server.last_round, history=history, online=online,
            sites=tuple(sites), refusals=refusals, recent_refusals=recent,
        )  # fmt: skip

    def total(self, key: str) -> int:
        return int(sum(r.get(key, 0) for r in self.history))

    @property
    def updates_received(self) -> int:
        return sum(len(r.get("clients", ())) for r in self.history)

    def last(self, key: str) -> float | None:
        """The newest round's value of `key` (e.g. auc), if any round was evaluated."""
        for record in reversed(self.history):
            if key in record:
                return float(record[key])
        return None


class _ServerCollector(Collector):
    """Counters and gauges computed from a fresh view at each scrape: they can never drift from the
    server's own history, and a resumed server reports the whole federation."""

    def __init__(self, server: RoundServer):
        self.server = server

    def collect(self) -> Sequence[Metric]:
        view = FederationView.of(self.server)
        info = GaugeMetricFamily("fedge_federation_info", "The federation and run this server aggregates", labels=["federation", "run"])
        info.add_metric([view.federation, view.run], 1)
        rounds = CounterMetricFamily("fedge_rounds_completed", "Rounds aggregated and checkpointed")
        rounds.add_metric([], len(view.history))
        target = GaugeMetricFamily("fedge_rounds_target", "Rounds this federation runs", value=view.rounds)
        received = CounterMetricFamily("fedge_updates_received", "Site updates that counted in an aggregate")
        received.add_metric([], view.updates_received)
        rejected = CounterMetricFamily("fedge_updates_rejected", "Refused inputs (updates, chunks, status, records) by reason", labels=["reason"])
        for reason, count in sorted(view.refusals.items()):
            rejected.add_metric([reason], count)
        uplink = CounterMetricFamily("fedge_uplink_bytes", "Update bytes that counted in aggregates (uplink)")
        uplink.add_metric([], view.total("uplink_bytes"))
        downlink = CounterMetricFamily("fedge_downlink_bytes", "Global-model bytes the selected sites fetched (downlink)")
        downlink.add_metric([], view.total("downlink_bytes"))
        online = GaugeMetricFamily("fedge_sites_online", "Sites whose signed status says online", value=len(view.online))
        site_online = GaugeMetricFamily("fedge_site_online", "1 while the site is online", labels=["site"])
        site_round = GaugeMetricFamily("fedge_site_last_round", "Last round that counted the site's update", labels=["site"])
        site_bytes = CounterMetricFamily("fedge_site_upload_bytes", "Bytes the site reported uploading", labels=["site"])
        site_seconds = GaugeMetricFamily("fedge_site_last_upload_seconds", "The site's last measured upload time", labels=["site"])
        for site in view.sites:
            site_online.add_metric([site.site], int(site.online))
            site_bytes.add_metric([site.site], site.upload_bytes)
            if site.last_round is not None:
                site_round.add_metric([site.site], site.last_round)
            if site.last_upload_seconds is not None:
                site_seconds.add_metric([site.site], site.last_upload_seconds)
        families: list[Metric] = [info, rounds, target, received, rejected, uplink, downlink, online, site_online, site_round, site_bytes, site_seconds]
        for key in EVALUATED:
            value = view.last(key)
            if value is not None:
                families.append(GaugeMetricFamily(f"fedge_last_{key}", f"Test {key} of the newest global model", value=value))
        return families


class _TimedStrategy:
    """The server's strategy, with each `aggregate` call timed into a histogram."""

    def __init__(self, strategy: Any, histogram: Histogram):
        self._strategy = strategy
        self._histogram = histogram

    def aggregate(self, *args: Any, **kwargs: Any) -> Any:
        with self._histogram.time():
            return self._strategy.aggregate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)


class ServerMetrics:
    """Prometheus metrics of one `RoundServer`, in a registry of their own."""

    def __init__(self, server: RoundServer, registry: CollectorRegistry | None = None):
        self.server = server
        self.registry = registry if registry is not None else CollectorRegistry()
        self.round_duration = Histogram(
            "fedge_round_duration_seconds", "Seconds from a round's announcement to its checkpoint",
            buckets=ROUND_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.aggregation = Histogram(
            "fedge_aggregation_seconds", "Seconds the strategy took to aggregate a round's updates",
            buckets=AGGREGATION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_ServerCollector(server))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        for record in server.state.history:  # a resumed federation: its earlier rounds count too
            self.round_duration.observe(float(record.get("seconds", 0.0)))
        self._attach()

    def _attach(self) -> None:
        previous = self.server.on_round

        def on_round(record: dict[str, Any]) -> None:
            self.round_duration.observe(float(record.get("seconds", 0.0)))
            if previous is not None:
                previous(record)

        self.server.on_round = on_round
        # A proxy, not a subclass: `name`, `round_metrics` and any option read through to the configured rule.
        self.server.strategy = cast("Strategy", _TimedStrategy(self.server.strategy, self.aggregation))

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsEndpoint:
        """`/metrics` on HOST:PORT until the endpoint is closed."""
        return MetricsEndpoint(self.registry, port, host)
