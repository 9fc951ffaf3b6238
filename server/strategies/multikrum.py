"""Multi-Krum (Blanchard et al., 2017; El Mhamdi et al., 2018)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import TensorSpec, gram_matrix
from fedge.errors import UsageError
from server.strategies.base import (
    ClientUpdate,
    WeightRule,
    register_strategy,
    weighted_mean,
)

log = logging.getLogger("fedge.server")


def krum_scores(gram: np.ndarray, f: int) -> np.ndarray:
    """Each update's sum of squared distances to its n - f - 2 nearest other updates."""
    n = len(gram)
    sq = np.diag(gram)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(dist, np.inf)
    nearest = max(n - f - 2, 1)
    return np.sort(dist, axis=1)[:, :nearest].sum(axis=1)


@register_strategy("multikrum")
@dataclass(frozen=True)
class MultiKrum(WeightRule):
    """Average the `selected` updates with the lowest Krum scores (default n - f; 1 is plain Krum).

    An update far from its n - f - 2 nearest neighbours scores high and is left out, so up to f
    attackers among n >= 2f + 3 sites cannot be chosen unless they look like honest ones. With fewer
    sites than that, f is lowered to (n - 3) // 2 for the round (logged). The chosen updates are
    averaged with equal weights (sample counts are self-reported).

    Cost: the n x n Gram matrix; on sparse updates O(n K) gathers for K explicit entries (each
    update scattered once into one d-sized buffer), on dense ones an n x d by d x n product. The
    mean of the chosen updates stays sparse.
    """

    f: int = 2
    selected: int | None = None

    def __post_init__(self) -> None:
        if not (type(self.f) is int and self.f >= 0):
            raise UsageError(f"strategy 'multikrum': option f (attackers tolerated) must be an int >= 0, got {self.f!r}")
        if self.selected is not None and not (type(self.selected) is int and self.selected >= 1):
            raise UsageError(f"strategy 'multikrum': option selected (updates averaged) must be an int >= 1, got {self.selected!r}")

    def choose(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> list[int]:
        """Indices (into `updates`) of the chosen updates, lowest score first."""
        n = len(updates)
        f = self.f
        if n < 2 * f + 3:
            f = max((n - 3) // 2, 0)
            log.warning("multikrum: %d updates cannot tolerate f=%d; using f=%d this round", n, self.f, f)
        scores = krum_scores(gram_matrix([u.delta for u in updates], manifest), f)
        keep = min(self.selected if self.selected is not None else n - f, n)
        return [int(i) for i in np.argsort(scores, kind="stable")[:keep]]

    def aggregate_weights(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        ordered = sorted(updates, key=lambda u: u.client)
        chosen = sorted(self.choose(ordered, manifest))
        return weighted_mean([ordered[i].delta for i in chosen], [1.0] * len(chosen), manifest)
