"""FedProx (Li et al., 2020): FedAvg on the server, a proximal term in every site's local training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.errors import UsageError
from server.strategies.base import register_strategy
from server.strategies.fedavg import FedAvg


@register_strategy("fedprox")
@dataclass(frozen=True)
class FedProx(FedAvg):
    """Sites minimise loss + mu/2 * ||w - w_global||^2, which bounds how far a site with skewed
    labels drifts from the global in its local epochs; the server averages as FedAvg does.

    `mu` is announced in the signed training settings (`TrainSettings.prox_mu`), so the sites need
    no configuration of their own. Li et al. tune mu in {0.001, 0.01, 0.1, 1}; 0.01 suits the
    Adam-trained CNNs here (benchmarks/noniid.py). Cost on the site: one extra pass over the
    trained parameters per step; on the wire: nothing.
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.mu, bool) or not isinstance(self.mu, int | float) or not (np.isfinite(self.mu) and 0 < self.mu <= 1e3):
            raise UsageError(f"strategy 'fedprox': option mu must be a number in (0, 1000], got {self.mu!r} (e.g. --strategy-options mu=0.01)")

    def announce(self) -> dict[str, object]:
        return {"prox_mu": float(self.mu)}
