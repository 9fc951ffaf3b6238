"""FedYogi (Reddi et al., 2021): FedAdam with Yogi's additive second moment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.strategies.base import register_strategy
from server.strategies.fedadam import FedAdam


@register_strategy("fedyogi")
@dataclass(frozen=True)
class FedYogi(FedAdam):
    """v = v - (1 - beta2) D^2 sign(v - D^2): v moves towards D^2 by at most (1 - beta2) D^2 per
    round, so one round of large deltas cannot shrink the effective step as fast as Adam lets it
    (Zaheer et al., 2018). Everything else, state and checkpointing included, is FedAdam's."""

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - np.float32(1 - self.beta2) * d2 * np.sign(v - d2)
