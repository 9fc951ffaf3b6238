"""Learning-rate schedules over a federation's rounds: the server announces each round's lr.

Why: a site's Adam restarts every round, so the only lever on a late-round step size is what the
server announces. Cosine decay (Loshchilov & Hutter, 2017) from the configured lr towards 0 over
the rounds lets early rounds move far and late ones settle; on BreastMNIST (546 images) it steadies
the final AUC across seeds (benchmarks/noniid.py). Round r of R gets lr * (1 + cos(pi (r-1)/R)) / 2:
the full lr in round 1 and never 0. The same function gives the centralized and local-only bounds
their per-epoch lr (fedge.tasks.bounds), so a bound and a federation train on the same schedule.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)


def check_schedule(name: str) -> LrSchedule:
    """The name as a schedule, or ValueError that names the choices."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule {name!r}: choose one of {', '.join(LR_SCHEDULES)}")
    return name  # type: ignore[return-value]


def scheduled_lr(lr: float, rnd: int, rounds: int, schedule: LrSchedule = "constant") -> float:
    """The lr announced for round `rnd` (1-based) of `rounds`."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        step = min(max(rnd, 1), max(rounds, 1)) - 1
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(rounds, 1)))
    raise ValueError(check_schedule(schedule))
