"""Norm clipping: every update is scaled down to an L2 bound before an (equal-weight) mean."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import TensorSpec
from fedge.errors import UsageError
from server.strategies.base import (
    ClientUpdate,
    WeightRule,
    check_positive,
    register_strategy,
    scaled,
    weighted_mean,
)
from server.validation import update_norm


@register_strategy("clipping")
@dataclass(frozen=True)
class NormClipping(WeightRule):
    """Mean of updates clipped to an L2 bound (Sun et al., 2019, "Can you really backdoor FL?").

    The bound is `max_norm` when given, else `multiplier` x the median norm of the round's updates
    (adaptive: no scale to tune, and fewer than half the sites cannot raise it). A scaled or inflated
    update then weighs no more than a typical one; a sign-flipped one still pulls, but only as far
    as a typical update. Sample counts are self-reported, so by default they buy no weight
    (`weighted=true` restores FedAvg's weights on the clipped deltas).

    Cost: O(K) for the norms and the mean (K explicit entries); sparse deltas stay sparse.
    """

    max_norm: float | None = None
    multiplier: float = 1.0
    weighted: bool = False

    def __post_init__(self) -> None:
        check_positive(self.name, max_norm=self.max_norm, multiplier=self.multiplier)
        if self.max_norm is not None and self.multiplier != 1.0:
            raise UsageError("strategy 'clipping': multiplier scales the adaptive (median) bound; leave it out with max_norm")

    def bound(self, norms: Sequence[float]) -> float:
        return float(self.max_norm) if self.max_norm is not None else self.multiplier * float(np.median(norms))

    def aggregate_weights(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        ordered = sorted(updates, key=lambda u: u.client)
        norms = [update_norm(u.delta) for u in ordered]
        bound = self.bound(norms)
        clipped = [scaled(u.delta, min(1.0, bound / n)) if n > 0 else u.delta for u, n in zip(ordered, norms)]
        weights = [float(max(u.num_samples, 1)) if self.weighted else 1.0 for u in ordered]
        return weighted_mean(clipped, weights, manifest)
