"""What a malicious site sends instead of its honest update: the attacks the robust strategies are measured against.

Each attack forges the dense delta (and the sample count) a compromised site hands to the announced
codec. Attacks that start from the site's own training (`trains`) get that delta; `label_flip`
trains on flipped labels; ALIE is omniscient (it reads the honest updates of the round), the
strongest form of that attack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

Dense = dict[str, np.ndarray]


@dataclass(frozen=True)
class AttackContext:
    own: Dense | None  # the attacker's own training delta (None for attacks that do not train)
    honest: Sequence[Dense]  # this round's honest deltas, before compression (ALIE reads them)
    num_samples: int  # the attacker's true sample count
    max_samples: int  # the most the server accepts (--max-samples)
    attackers: int  # how many sites attack this round
    rng: np.random.Generator


@dataclass(frozen=True)
class Attack:
    name: str
    trains: bool  # trains on its own shard first
    flips_labels: bool
    forge: Callable[[AttackContext], tuple[Dense, int]]
    describe: str


def _scale(delta: Dense, factor: float) -> Dense:
    return {k: (v * np.float32(factor)).astype(np.float32) for k, v in delta.items()}


def _own(ctx: AttackContext) -> Dense:
    if ctx.own is None:
        raise ValueError("this attack needs the attacker's own training delta")
    return ctx.own


def _alie(ctx: AttackContext) -> tuple[Dense, int]:
    """Baruch et al., 2019: mean - z * std of the honest updates, per coordinate, with z from the
    number of sites the attackers must out-vote (the most a coordinate-wise rule will not reject)."""
    n = len(ctx.honest) + ctx.attackers
    supporters = n // 2 + 1 - ctx.attackers
    z = NormalDist().inv_cdf((n - supporters) / n)
    out = {}
    for name in ctx.honest[0]:
        stack = np.stack([h[name] for h in ctx.honest]).astype(np.float64)
        out[name] = (stack.mean(0) - z * stack.std(0)).astype(np.float32)
    return out, ctx.num_samples


def _gaussian(ctx: AttackContext) -> tuple[Dense, int]:
    like = ctx.honest[0]
    return {k: ctx.rng.standard_normal(v.shape).astype(np.float32) for k, v in like.items()}, ctx.num_samples


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("sign_flip", True, False, lambda c: (_scale(_own(c), -10.0), c.num_samples), "its own update x -10"),
        Attack("gaussian", False, False, _gaussian, "N(0, 1) in every coordinate"),
        Attack("scaled", True, False, lambda c: (_scale(_own(c), 100.0), c.num_samples), "its own update x 100"),
        Attack(
            "inflated_samples",
            True,
            False,
            lambda c: (_scale(_own(c), -1.0), c.max_samples),
            "its own update negated, claiming the most samples the server accepts (1e9 is refused by --max-samples)",
        ),
        Attack("label_flip", True, True, lambda c: (_own(c), c.num_samples), "honest training on labels flipped to C-1-y"),
        Attack("alie", False, False, _alie, "a little is enough: honest mean - z * std"),
    )
}


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]
