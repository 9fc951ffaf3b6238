"""The strategy contract and its registry: a strategy turns a round's accepted updates into one delta.

Strategies are frozen dataclasses whose fields are their options, so `get_strategy(name, **options)`
can name every valid option when one is wrong (as training modes do), and a configured rule is a
value that cannot drift during a federation. Every mistake in a name or option is a UsageError
(exit code 2 from the CLI).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from compression import (
    SparseAccumulator,
    SparseTensor,
    TensorSpec,
    order_statistic_mean,
)
from fedge.errors import UsageError
from fedge.protocol import TrainSettings
from fedge.registry import Registry
from fedge.weights import NORM_STAT_SUFFIXES

Delta = dict[str, np.ndarray | SparseTensor]
STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
S = TypeVar("S", bound="type[Strategy]")
ROBUST_REFUSAL = ("it bounds what one lying site does to the model, but the head fit from the sites' summed statistics has "
                  "no such bound: one site could set it anywhere")  # fmt: skip


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    num_samples: int
    delta: Delta
    nbytes: int
    norm: float = 0.0  # L2 norm of the decoded delta (validation computed it)


@dataclass(frozen=True)
class Strategy(ABC):
    """Base of every aggregation rule. `aggregate` receives at least one update, all of the round's
    manifest, and returns float32 arrays in manifest shapes."""

    name: ClassVar[str]
    # Why a head-calibration round (fedge.tasks.calibration) cannot follow this rule, or None: the
    # server sums the sites' statistics as sent, which only rules that take each site at its word allow.
    calibration_refusal: ClassVar[str | None] = None

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]: ...

    def round_metrics(self) -> dict[str, float]:
        """Numbers the last `aggregate` produced that belong in the round's record (e.g. privacy spent)."""
        return {}

    def resume(self, rounds_done: int) -> None:
        """Called once by a server that resumes after `rounds_done` rounds (stateful rules catch up)."""

    def announce(self) -> dict[str, object]:
        """Training settings the sites must follow under this rule (merged into the signed
        `TrainSettings` of every announcement, e.g. FedProx's `prox_mu`, FedBN's `local_norm`)."""
        return {}

    def commit(self) -> None:
        """The server applied the last `aggregate`'s result. The non-finite guard may call
        `aggregate` several times per round, so a stateful rule (a server optimizer) keeps what it
        computed as pending and makes it its state only here."""

    def state(self) -> dict[str, np.ndarray]:
        """State to checkpoint with the round (a server optimizer's moments), so a resumed server
        continues bit for bit; empty for stateless rules."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state` returned (at resume, after `resume`)."""
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, but the checkpoint holds {sorted(state)[:3]}")


@dataclass(frozen=True)
class WeightRule(Strategy):
    """Base of the rules that treat an update as a vector (clipping, trimmed mean, Multi-Krum,
    centered clipping): they see the trainable tensors only, and normalisation statistics
    (BatchNorm running_mean/running_var) are aggregated by the coordinate-wise median.

    Those statistics are not gradients, and they dominate an update's norm (measured: 5.09 of a
    5.12 norm on the demo's CNN), so norms and distances would be about them. Averaged, even after
    clipping, they let a few sites drive a running_var negative: every weight stays finite and every
    output is NaN. Their median stays inside the honest sites' values while attackers are fewer
    than half.
    """

    calibration_refusal = ROBUST_REFUSAL

    @abstractmethod
    def aggregate_weights(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        """The rule on `updates` restricted to the trainable tensors of `manifest`."""

    def aggregate(self, updates: Sequence[ClientUpdate], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
        stats = [s for s in manifest if s.name.endswith(NORM_STAT_SUFFIXES)]
        weights = [s for s in manifest if not s.name.endswith(NORM_STAT_SUFFIXES)]
        if not stats:
            return self.aggregate_weights(updates, manifest)
        names = {s.name for s in weights}
        restricted = [dataclasses.replace(u, delta={k: v for k, v in u.delta.items() if k in names}) for u in updates]
        out = self.aggregate_weights(restricted, weights) if weights else {}
        n = len(updates)
        out.update({s.name: order_statistic_mean([u.delta[s.name] for u in updates], (n - 1) // 2, n // 2 + 1) for s in stats})
        return {s.name: out[s.name] for s in manifest}


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: registers the strategy under `name`; a second class with the same name is an error."""

    def wrap(cls: S) -> S:
        STRATEGIES.register(name)(cls)
        cls.name = name
        return cls

    return wrap


def strategy_options(name: str) -> dict[str, object]:
    """The options of strategy `name` with their defaults (for errors and `--help`)."""
    return {f.name: f.default for f in dataclasses.fields(STRATEGIES.get(name)) if f.init}


def get_strategy(name: str, **options: object) -> Strategy:
    """The strategy `name` configured with `options`; a wrong name or option says what is valid (UsageError)."""
    cls = STRATEGIES.get(name)
    valid = strategy_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) or "none"
        raise UsageError(f"strategy {name!r} has no option {', '.join(unknown)}; its options: {listed}")
    return cls(**options)


def announced_train(train: TrainSettings, strategy: Strategy) -> TrainSettings:
    """The training settings a server announces: its own, plus what its strategy asks of the sites
    (validated as any announcement is). UsageError for a combination the sites cannot train."""
    merged = train.model_copy(update=strategy.announce())
    if merged.prox_mu > 0 and merged.dp_noise_multiplier is not None:
        raise UsageError(f"strategy {strategy.name!r} (FedProx's proximal term) does not combine with DP-SGD: drop --dp-noise-multiplier or use fedavg")
    try:
        return TrainSettings.model_validate(merged.model_dump())
    except ValueError as exc:
        raise UsageError(f"strategy {strategy.name!r} with these training settings: {exc}") from None


def weighted_mean(deltas: Sequence[Delta], weights: Sequence[float], manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
    """sum(w * delta) / sum(w) without densifying sparse deltas.

    Weights are normalised first, so every partial sum is a sub-convex combination: huge finite
    values (an attacker's 1e38) cannot overflow float32 on the way to a finite mean.
    """
    total = float(sum(weights))
    acc = SparseAccumulator(manifest)
    for delta, weight in zip(deltas, weights):
        if weight > 0:
            acc.add(delta, weight / total)
    return acc.result()


def scaled(delta: Delta, factor: float) -> Delta:
    """delta * factor, sparse staying sparse (same indices)."""
    f = np.float32(factor)
    return {name: SparseTensor(v.shape, v.indices, v.values * f) if isinstance(v, SparseTensor) else v * f for name, v in delta.items()}


def check_positive(owner: str, **values: float | None) -> None:
    """Config check in __post_init__: each named value, when set, must be a positive finite number."""
    for field_name, value in values.items():
        if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value) and value > 0):
            raise UsageError(f"strategy {owner!r}: option {field_name} must be a positive number, got {value!r}")
