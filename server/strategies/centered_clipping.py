"""Centered clipping (Karimireddy, He and Jaggi, 2021): the trust rule that needs no server data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import SparseTensor, TensorSpec
from server.strategies.base import ClientUpdate, Strategy, check_positive, register_strategy
from server.validation import update_norm


@register_strategy("centered_clipping")
@dataclass(frozen=True)
class CenteredClipping(Strategy):
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
    size n x d.
    """

    iterations: int = 3
    tau: float | None = None

    def __post_init__(self) -> None:
        if not (type(self.iterations) is int and 1 <= self.iterations <= 100):
            raise ValueError(f"strategy 'centered_clipping': option iterations must be an int in [1, 100], got {self.iterations!r}")
        check_positive(self.name, tau=self.tau)

    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        ordered = sorted(updates, key=lambda u: u.client)
        n = len(ordered)
        sq_norms = np.array([update_norm(u.delta) for u in ordered]) ** 2
        center = {s.name: np.zeros(s.numel) for s in manifest}
        for _ in range(self.iterations):
            dots = np.array([_dot(u.delta, center) for u in ordered])
            center_sq = sum(float(c @ c) for c in center.values())
            dist = np.sqrt(np.maximum(sq_norms - 2 * dots + center_sq, 0.0))
            tau = self.tau if self.tau is not None else float(np.median(dist))
            scale = np.where(dist > tau, tau / np.maximum(dist, np.finfo(float).tiny), 1.0)
            new = {name: c * (1.0 - scale.mean()) for name, c in center.items()}
            for u, s in zip(ordered, scale):
                for name, value in u.delta.items():
                    if isinstance(value, SparseTensor):
                        new[name][value.indices] += (s / n) * value.values.astype(np.float64)
                    else:
                        new[name] += (s / n) * value.reshape(-1).astype(np.float64)
            center = new
        return {s.name: center[s.name].astype(np.float32).reshape(s.shape) for s in manifest}


def _dot(delta: dict[str, np.ndarray | SparseTensor], center: dict[str, np.ndarray]) -> float:
    total = 0.0
    for name, value in delta.items():
        if isinstance(value, SparseTensor):
            total += float(center[name][value.indices] @ value.values.astype(np.float64))
        else:
            total += float(center[name] @ value.reshape(-1).astype(np.float64))
    return total
