"""Latency of any callable: the one measurement the parity check and `fedge bench` both use."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # items per second: batch_size / mean latency
    batch_size: int
    iters: int


def measure_latency(run: Callable[[], object], warmup: int = 10, iters: int = 100, batch_size: int = 1) -> LatencyStats:
    """Time `iters` calls of `run` after `warmup` untimed ones (caches, lazy init, allocator warm-up).

    `run` must block until its result is ready (synchronise GPU streams inside it).
    """
    if iters < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need iters >= 1, warmup >= 0, batch_size >= 1; got {iters}, {warmup}, {batch_size}")
    for _ in range(warmup):
        run()
    times = np.empty(iters, dtype=np.float64)
    for i in range(iters):
        start = time.perf_counter_ns()
        run()
        times[i] = (time.perf_counter_ns() - start) / 1e6
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    mean = float(times.mean())
    return LatencyStats(
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        mean_ms=mean,
        throughput=batch_size * 1000.0 / mean if mean > 0 else float("inf"),
        batch_size=batch_size,
        iters=iters,
    )
