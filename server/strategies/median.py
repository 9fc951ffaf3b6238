"""Coordinate-wise median (Yin et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import TensorSpec, order_statistic_mean
from server.strategies.base import ROBUST_REFUSAL, ClientUpdate, Strategy, register_strategy


@register_strategy("median")
@dataclass(frozen=True)
class CoordinateMedian(Strategy):
    """Per coordinate, the median of the n updates' values (the mean of the two middle ones for even n).

    Fewer than half the sites cannot move any coordinate outside the range of the honest values.
    Sample counts are ignored (a self-reported count must not buy influence). On sparse updates a
    coordinate a site did not send counts as its 0, which is exactly what that site's update says.

    Cost: all-sparse tensors stay sparse, O(K log K) for K explicit entries (one sort) plus the O(d)
    result; a tensor that any update sent dense (BatchNorm statistics, dense codecs) is densified to
    n x numel and sorted, O(n d log n).
    """

    calibration_refusal = ROBUST_REFUSAL

    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        n = len(updates)
        lo, hi = (n - 1) // 2, n // 2 + 1
        return {s.name: order_statistic_mean([u.delta[s.name] for u in updates], lo, hi) for s in manifest}
