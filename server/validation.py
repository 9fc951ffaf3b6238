"""The server's own sanity policy on a decoded update (the wire checks are in `fedge.rounds.update`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from compression import SparseTensor
from fedge.rounds import RejectedUpdate
from fedge.tasks.calibration import FeatureStats


def update_norm(delta: Mapping[str, np.ndarray | SparseTensor]) -> float:
    """L2 norm in float64 (float32 squares of 3e38 overflow); inf or nan when any value is not finite."""
    total = 0.0
    for value in delta.values():
        values = (value.values if isinstance(value, SparseTensor) else value).reshape(-1).astype(np.float64)
        total += float(np.dot(values, values))
    return float(np.sqrt(total))


def check_update(delta: Mapping[str, np.ndarray | SparseTensor], max_norm: float) -> float:
    """The update's norm, if it is finite and within the bound."""
    norm = update_norm(delta)
    if not np.isfinite(norm):
        raise RejectedUpdate("non-finite", "update holds NaN or Inf values (or values whose squares overflow)")
    if norm > max_norm:
        raise RejectedUpdate("norm-bound", f"update L2 norm {norm:.4g} over the bound {max_norm:.4g} (--max-update-norm)")
    return norm


def check_head_stats(delta: Mapping[str, np.ndarray | SparseTensor], num_samples: int) -> float:
    """A head-calibration round's statistics are not a delta, and no norm bound fits them (the Gram
    matrix grows with the images): they must be statistics some set of `num_samples` images has."""
    try:
        FeatureStats.from_tensors(delta).check(num_samples)  # type: ignore[arg-type]  # STATS_CODEC is dense
    except ValueError as exc:
        raise RejectedUpdate("bad-head-stats", str(exc)) from None
    return 0.0
