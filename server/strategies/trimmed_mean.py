"""Coordinate-wise trimmed mean (Yin et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import TensorSpec, order_statistic_mean
from fedge.errors import UsageError
from server.strategies.base import ClientUpdate, WeightRule, register_strategy


@register_strategy("trimmed_mean")
@dataclass(frozen=True)
class TrimmedMean(WeightRule):
    """Per coordinate, drop the floor(beta * n) largest and smallest values and average the rest.

    Tolerates up to floor(beta * n) attackers per coordinate while averaging more honest values than
    the median (less variance). Sample counts are ignored. A coordinate a site did not send counts as 0.

    Cost: as the median: all-sparse tensors O(K log K) for K explicit entries, never n x numel;
    tensors that any update sent dense are densified to n x numel and sorted.
    """

    beta: float = 0.2

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, int | float) and 0 <= self.beta < 0.5):
            raise UsageError(f"strategy 'trimmed_mean': option beta (fraction trimmed at each end) must be in [0, 0.5), got {self.beta!r}")

    def aggregate_weights(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        n = len(updates)
        b = int(np.floor(self.beta * n))
        return {s.name: order_statistic_mean([u.delta[s.name] for u in updates], b, n - b) for s in manifest}
