"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): Adam as the server's optimizer,
stepping on the round's sample-weighted mean delta."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from compression import TensorSpec
from fedge.errors import UsageError
from fedge.weights import NORM_STAT_SUFFIXES
from server.strategies.base import ClientUpdate, Strategy, check_positive, register_strategy, weighted_mean

Moments = dict[str, np.ndarray]


@register_strategy("fedadam")
@dataclass(frozen=True)
class FedAdam(Strategy):
    """The mean delta D of FedAvg is treated as a pseudo-gradient (Reddi et al., Algorithm 2):

        m = beta1 m + (1 - beta1) D
        v = beta2 v + (1 - beta2) D^2        (FedYogi: v - (1 - beta2) D^2 sign(v - D^2))
        global += lr * m / (sqrt(v) + tau)

    with m = 0 and v = tau^2 at the start and no bias correction, as in the paper. The mean is
    FedAvg's, normalised before it is summed (no float32 overflow, whatever a site
    sends), from the sparse updates without densifying them; the step is dense, since m
    and v remember coordinates that this round's top-k did not send. Normalisation statistics
    (running_mean/var) are not gradients: they take the plain mean.

    The moments are the server's state: pending after `aggregate` (the non-finite guard may call
    it again), the state after `commit`, and checkpointed each round (`state`/`load_state`), so a
    resumed server continues bit for bit. Cost: O(K) for the mean, O(d) for the step and 2d floats
    of state.
    """

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    _moments: dict[str, Moments] = field(default_factory=dict, init=False, repr=False, compare=False)
    _pending: dict[str, Moments] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive(self.name, lr=self.lr, tau=self.tau)
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise UsageError(f"strategy {self.name!r}: option {key} must be in [0, 1), got {value!r}")

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2

    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        ordered = sorted(updates, key=lambda u: u.client)
        mean = weighted_mean([u.delta for u in ordered], [float(max(u.num_samples, 1)) for u in ordered], manifest)
        m_old, v_old = self._moments.get("m", {}), self._moments.get("v", {})
        m_new, v_new, out = {}, {}, {}
        f32 = np.float32
        for spec in manifest:
            d = mean[spec.name]
            if spec.name.endswith(NORM_STAT_SUFFIXES):
                out[spec.name] = d
                continue
            m = m_old.get(spec.name, np.zeros(spec.shape, np.float32))
            v = v_old.get(spec.name, np.full(spec.shape, self.tau**2, np.float32))
            m_new[spec.name] = (f32(self.beta1) * m + f32(1 - self.beta1) * d).astype(np.float32)
            with np.errstate(over="ignore"):  # a square beyond float32 makes v inf: that coordinate takes no step
                v_new[spec.name] = self.second_moment(v, d * d).astype(np.float32)
            out[spec.name] = (f32(self.lr) * m_new[spec.name] / (np.sqrt(v_new[spec.name]) + f32(self.tau))).astype(np.float32)
        self._pending.clear()
        self._pending.update(m=m_new, v=v_new)
        return out

    def commit(self) -> None:
        if self._pending:
            self._moments.clear()
            self._moments.update(self._pending)
            self._pending.clear()

    def state(self) -> dict[str, np.ndarray]:
        return {f"{kind}/{name}": value for kind, tensors in self._moments.items() for name, value in tensors.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        moments: dict[str, Moments] = {"m": {}, "v": {}}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind not in moments or not name:
                raise ValueError(f"strategy {self.name!r}: checkpointed state holds {key!r}, not m/<tensor> or v/<tensor>")
            moments[kind][name] = np.asarray(value, dtype=np.float32)
        self._moments.clear()
        self._moments.update(moments)
        self._pending.clear()
