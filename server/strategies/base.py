"""Aggregation strategies, registered by name. Each turns accepted client deltas into one global delta."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from compression import SparseAccumulator, SparseTensor, TensorSpec

STRATEGIES: dict[str, type["Strategy"]] = {}


def register_strategy(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    def wrap(cls: type["Strategy"]) -> type["Strategy"]:
        STRATEGIES[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    num_samples: int
    delta: dict[str, np.ndarray | SparseTensor]
    nbytes: int
    norm: float = 0.0  # L2 norm of the decoded delta (validation computed it)


class Strategy:
    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        raise NotImplementedError


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Sample-weighted mean of deltas (McMahan et al.); sparse deltas are accumulated without densifying.

    Updates are summed in client-id order so a resumed run reproduces an uninterrupted one bit for bit.
    """

    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        acc = SparseAccumulator(manifest)
        for update in sorted(updates, key=lambda u: u.client):
            acc.add(update.delta, float(max(update.num_samples, 1)))
        return acc.result()


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
