"""Prometheus metrics of one site agent: local training time, upload time and bytes, rounds taken
part in, refusals by reason, the error-feedback residual's norm and the size of the local store.

The agent is not changed: `AgentMetrics` reads its public attributes at each scrape, times
`train_local` through a thin wrapper around `agent.task`, and times update uploads through a
wrapper around the session the agent's transport factory makes (`AgentMetrics.transport`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedge.metrics_http import MetricsEndpoint

if TYPE_CHECKING:
    from edge_client.agent import Agent
    from edge_client.config import AgentConfig
    from fedge.tasks import ClassificationTask
    from fedge.transport import SessionFactory

TRAIN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STORE_RESCAN_SECONDS = 60.0  # a DICOM store may hold many files: walk it at most once a minute


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while walking
    return total


def residual_norm(agent: Agent) -> float:
    """L2 norm of the error-feedback residual (0 before the first round, or without `ef`)."""
    squares = sum(float(np.square(v, dtype=np.float64).sum()) for v in agent.state.residual.state_dict().values())
    return float(np.sqrt(squares))


class _TimedTask:
    """The agent's task, with each local training's own measured seconds observed."""

    def __init__(self, task: Any, histogram: Histogram):
        self._task = task
        self._histogram = histogram

    def train_local(self, *args: Any, **kwargs: Any) -> Any:
        result = self._task.train_local(*args, **kwargs)
        self._histogram.observe(float(result.seconds))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


class _TimedSession:
    """The agent's session; an update upload (publish_chunked on an update topic, until the broker
    acknowledged every chunk, as the agent itself measures it) is timed and counted."""

    def __init__(self, session: Any, metrics: AgentMetrics):
        self._session = session
        self._metrics = metrics

    def publish_chunked(self, topic_for: Callable[[int], str], data: bytes, **kwargs: Any) -> Any:
        started = time.perf_counter()
        info = self._session.publish_chunked(topic_for, data, **kwargs)
        if "/update/" in topic_for(0):
            self._metrics.upload_seconds.observe(time.perf_counter() - started)
            self._metrics.upload_bytes.inc(len(data))
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _AgentCollector(Collector):
    def __init__(self, agent: Agent):
        self.agent = agent
        self._store: tuple[float, int] | None = None  # (when walked, bytes)

    def _store_bytes(self) -> int | None:
        data_dir = self.agent.config.data_dir
        if data_dir is None:
            return None
        now = time.monotonic()
        if self._store is None or now - self._store[0] > STORE_RESCAN_SECONDS:
            self._store = (now, folder_bytes(Path(data_dir)))
        return self._store[1]

    def collect(self) -> Sequence[Metric]:
        agent = self.agent
        info = GaugeMetricFamily("fedge_agent_info", "The federation and site this agent trains for", labels=["federation", "site"])
        info.add_metric([agent.config.federation, agent.config.site], 1)
        done = list(agent.rounds_done)
        rounds = CounterMetricFamily("fedge_agent_rounds_completed", "Rounds this agent sent an update for")
        rounds.add_metric([], len(done))
        families: list[Metric] = [info, rounds]
        if done:
            families.append(GaugeMetricFamily("fedge_agent_last_round", "The last round this agent sent an update for", value=max(done)))
        refusals = CounterMetricFamily("fedge_agent_refusals", "Refused inputs (records, globals, chunks) by reason", labels=["reason"])
        counts = dict(agent.refusals.counts)
        for reason, count in sorted(counts.items()):
            refusals.add_metric([reason], count)
        families.append(refusals)
        families.append(GaugeMetricFamily("fedge_agent_residual_norm", "L2 norm of the error-feedback residual", value=residual_norm(agent)))
        state = GaugeMetricFamily("fedge_agent_state_bytes", "Bytes of the agent's state folder (residual, cached update)")
        state.add_metric([], folder_bytes(Path(agent.config.state_dir)))
        families.append(state)
        store = self._store_bytes()
        if store is not None:
            families.append(GaugeMetricFamily("fedge_agent_store_bytes", "Bytes of the local dataset store (--data-dir)", value=store))
        return families


class AgentMetrics:
    """Prometheus metrics of one `Agent`, in a registry of their own."""

    def __init__(self, agent: Agent, registry: CollectorRegistry | None = None):
        self.agent = agent
        self.registry = registry if registry is not None else CollectorRegistry()
        self.train_seconds = Histogram("fedge_agent_train_seconds", "Seconds of each round's local training", buckets=TRAIN_BUCKETS, registry=self.registry)
        self.upload_seconds = Histogram(
            "fedge_agent_upload_seconds", "Seconds to upload an update until the broker acknowledged every chunk",
            buckets=UPLOAD_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.upload_bytes = Counter("fedge_agent_upload_bytes", "Update bytes uploaded (resends included)", registry=self.registry)
        self.registry.register(_AgentCollector(agent))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        agent.task = cast("ClassificationTask", _TimedTask(agent.task, self.train_seconds))

    def transport(self, factory: SessionFactory) -> SessionFactory:
        """A session factory whose sessions time update uploads; pass it to `Agent.run(transport=...)`."""

        def make(*args: Any, **kwargs: Any) -> Any:
            return _TimedSession(factory(*args, **kwargs), self)

        return make  # type: ignore[return-value]

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsEndpoint:
        return MetricsEndpoint(self.registry, port, host)


def run_agent_with_metrics(config: AgentConfig, port: int, host: str = "127.0.0.1", log_level: int = logging.WARNING) -> list[int]:
    """`fedge agent --metrics-port`: the agent of `edge_client.runner.run_agent`, with /metrics served."""
    from edge_client.runner import build_agent
    from fedge.transport import MqttSession

    logging.basicConfig(level=log_level, format=f"%(asctime)s {config.site} %(levelname)s %(message)s")
    agent = build_agent(config)
    metrics = AgentMetrics(agent)
    with metrics.serve(port, host) as endpoint:
        logging.getLogger("fedge.agent").info("%s: metrics on %s", config.site, endpoint.url)
        return agent.run(transport=metrics.transport(partial(MqttSession, config.broker)))
