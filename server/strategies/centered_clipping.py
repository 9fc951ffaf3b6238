"""Centered clipping (Karimireddy, He and Jaggi, 2021): the trust rule that needs no server data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import SparseTensor, TensorSpec
from fedge.errors import UsageError
from server.strategies.base import (
    ClientUpdate,
    WeightRule,
    check_positive,
    register_strategy,
)


@register_strategy("centered_clipping")
@dataclass(frozen=True)
class CenteredClipping(WeightRule):
    """Trust each update only up to a radius around a running center:
    v <- v + mean_i clip(x_i - v, tau), repeated `iterations` times from v = 0 (no change).

    Unlike norm clipping, the clip is around the current estimate, so a sign-flipped update (far
    from where the honest ones agree) pulls by at most tau / n per iteration, however it is scaled.
    `tau` fixes the radius; by default it is the median distance of the updates to the center,
    recomputed each iteration, so at least half the updates count in full. Sample counts are
    ignored. Starting from zero keeps the rule stateless: a resumed server aggregates as an
    uninterrupted one would (the paper starts from the previous round's momentum).

    Cost per iteration: O(K) for K explicit entries (distances through <x_i, v> gathered at each
    update's indices, the clipped sum scattered back) plus O(d) for the dense center; nothing of
    size n x d. The gathers are random accesses into the d-sized center, so at top-1% density a
    dense matrix-vector product streaming n x d floats is about as fast (benchmarks/aggregation.py).
    """

    iterations: int = 3
    tau: float | None = None

    def __post_init__(self) -> None:
        if not (type(self.iterations) is int and 1 <= self.iterations <= 100):
            raise UsageError(f"strategy 'centered_clipping': option iterations must be an int in [1, 100], got {self.iterations!r}")
        check_positive(self.name, tau=self.tau)

    def aggregate_weights(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        ordered = sorted(updates, key=lambda u: u.client)
        n = len(ordered)
        offsets = np.cumsum([0] + [s.numel for s in manifest])
        entries = [_flat_entries(u.delta, manifest, offsets) for u in ordered]
        sq_norms = np.array([float(v @ v) for _, v in entries])
        center = np.zeros(int(offsets[-1]))
        for iteration in range(self.iterations):
            dots = np.array([float(center[i] @ v) for i, v in entries]) if iteration else np.zeros(n)  # the first center is 0
            dist = np.sqrt(np.maximum(sq_norms - 2 * dots + float(center @ center), 0.0))
            tau = self.tau if self.tau is not None else float(np.median(dist))
            scale = np.where(dist > tau, tau / np.maximum(dist, np.finfo(float).tiny), 1.0)
            center *= 1.0 - scale.mean()
            for (i, v), s in zip(entries, scale):
                center[i] += (s / n) * v  # indices are unique within one update: a plain fancy-index add is exact
        return {s.name: center[a:b].astype(np.float32).reshape(s.shape) for s, a, b in zip(manifest, offsets[:-1], offsets[1:])}


def _flat_entries(delta: dict[str, np.ndarray | SparseTensor], manifest: list[TensorSpec], offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The update's explicit entries as (flat indices over the manifest, float64 values); dense tensors count every coordinate."""
    idx, val = [], []
    for spec, start in zip(manifest, offsets[:-1]):
        value = delta[spec.name]
        if isinstance(value, SparseTensor):
            idx.append(value.indices + start)
            val.append(value.values)
        else:
            idx.append(np.arange(start, start + spec.numel))
            val.append(value.reshape(-1))
    return np.concatenate(idx), np.concatenate(val).astype(np.float64)
