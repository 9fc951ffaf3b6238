"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the round's deltas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import SparseAccumulator, TensorSpec
from server.strategies.base import ClientUpdate, Strategy, register_strategy


@register_strategy("fedavg")
@dataclass(frozen=True)
class FedAvg(Strategy):
    """Sample-weighted mean; not robust: one site's update (or claimed sample count) can move it anywhere.

    Sums sample-weighted deltas in float32, as a dense Flower-style average does: weights times huge
    finite values can overflow, and the server then leaves out the largest update
    (`RoundServer._aggregate`). Updates are summed in client-id order so a resumed run reproduces an
    uninterrupted one bit for bit.

    Cost: O(K) for K explicit entries over all updates plus one O(d) result; sparse deltas are never
    densified.
    """

    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        acc = SparseAccumulator(manifest)
        for update in sorted(updates, key=lambda u: u.client):
            acc.add(update.delta, float(max(update.num_samples, 1)))
        return acc.result()
