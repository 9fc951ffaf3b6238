"""DP-FedAvg (McMahan et al., 2018): client-level central differential privacy at the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from compression import TensorSpec
from fedge.errors import UsageError
from fedge.tasks.dp import DEFAULT_DELTA, PrivacyLedger
from server.strategies.base import (
    ClientUpdate,
    Strategy,
    check_positive,
    register_strategy,
    scaled,
    weighted_mean,
)
from server.validation import update_norm


@register_strategy("dp_fedavg")
@dataclass(frozen=True)
class DPFedAvg(Strategy):
    """Clip every update to L2 norm `max_norm`, average with equal weights, and add Gaussian noise
    of std noise_multiplier * max_norm / n to every coordinate of the mean.

    This is the Gaussian mechanism on the sum of clipped updates (sensitivity `max_norm` when one
    site is added or removed; n, the number of updates, is treated as public). After each round,
    `round_metrics` reports the (epsilon, delta) spent so far by opacus's RDP accountant, with
    `sample_rate` the fraction of the federation's sites selected per round (1.0 when every site
    takes part, as `fedge server` selects them). The clip bound is fixed, not adaptive: a bound
    taken from the updates' own norms would depend on the data outside the accounting.

    Noise goes on every coordinate, so the aggregate is dense even when the updates are sparse
    (noise only where a site sent something would reveal where that was). Updates are compressed
    before they arrive: the server's guarantee is on what it publishes, whatever the codec did.
    Utility needs many sites: the noise on the mean falls as 1/n.

    `seed` is for simulations only: whoever knows it can subtract the noise. Without it the noise
    comes from the operating system's entropy.

    Cost: O(K) for clipping and the mean (sparse stays sparse), plus O(d) Gaussian draws.
    """

    calibration_refusal = "the sites' class counts and feature sums would travel without its noise, outside the privacy guarantee"

    noise_multiplier: float = 1.0
    max_norm: float = 1.0
    delta: float = DEFAULT_DELTA
    sample_rate: float = 1.0
    seed: int | None = None
    _ledger: PrivacyLedger = field(default_factory=PrivacyLedger, init=False, repr=False, compare=False)
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive(self.name, noise_multiplier=self.noise_multiplier, max_norm=self.max_norm)
        if not (0 < self.delta < 1 and 0 < self.sample_rate <= 1):
            raise UsageError(f"strategy 'dp_fedavg': delta must be in (0, 1) and sample_rate in (0, 1], got {self.delta!r}, {self.sample_rate!r}")
        object.__setattr__(self, "_rng", np.random.default_rng(self.seed))  # frozen options, one noise stream

    def resume(self, rounds_done: int) -> None:
        """A restarted server has published `rounds_done` noisy aggregates under these settings already."""
        self._ledger.history.clear()
        self._ledger.record(self.noise_multiplier, self.sample_rate, rounds_done)

    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        ordered = sorted(updates, key=lambda u: u.client)
        clipped = []
        for u in ordered:
            norm = update_norm(u.delta)
            clipped.append(scaled(u.delta, min(1.0, self.max_norm / norm)) if norm > 0 else u.delta)
        mean = weighted_mean(clipped, [1.0] * len(clipped), manifest)
        std = self.noise_multiplier * self.max_norm / len(ordered)
        noisy = {name: (value + self._rng.normal(0.0, std, size=value.shape)).astype(np.float32) for name, value in mean.items()}
        self._ledger.record(self.noise_multiplier, self.sample_rate, 1)
        return noisy

    def round_metrics(self) -> dict[str, float]:
        return {"dp_epsilon": self._ledger.epsilon(self.delta), "dp_delta": self.delta}
