"""Checks an update must pass before it counts; each failure has a kind (counted) and a reason (logged)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from compression import SparseTensor, TensorSpec
from fedge import weights as W
from fedge.protocol import EnvelopeHeader


class RejectedUpdate(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Expected:
    """What the open round accepts: the server's run, the round, its announced global, its codec."""

    federation: str
    run: str
    round: int
    model_sha256: str
    selected: Collection[str]
    codec: str
    manifest: list[TensorSpec]
    max_samples: int


def validate_header(header: EnvelopeHeader, *, topic_client: str, expected: Expected) -> None:
    if header.kind != "update":
        raise RejectedUpdate("bad-envelope", f"envelope kind {header.kind!r} on an update topic")
    if header.federation != expected.federation:
        raise RejectedUpdate("wrong-federation", f"wrong federation {header.federation!r}")
    if header.sender != topic_client:
        raise RejectedUpdate("wrong-sender", f"sender {header.sender!r} does not match topic client {topic_client!r}")
    if header.run != expected.run:
        raise RejectedUpdate("wrong-run", f"update for run {header.run!r}, this server runs {expected.run!r} (a replay from another run?)")
    if header.round != expected.round:
        kind = "stale" if header.round < expected.round else "future"
        raise RejectedUpdate(kind, f"{kind} round {header.round} (current {expected.round})")
    if header.model_sha256 != expected.model_sha256:
        raise RejectedUpdate("wrong-base", "update was not trained from this round's announced global model")
    if expected.selected and header.sender not in expected.selected:
        raise RejectedUpdate("not-selected", f"client {header.sender!r} was not selected for round {expected.round}")
    if header.codec != expected.codec:
        raise RejectedUpdate("wrong-codec", f"codec {header.codec!r} differs from the announced {expected.codec!r}")
    if not 1 <= header.num_samples <= expected.max_samples:
        raise RejectedUpdate("sample-count", f"sample count {header.num_samples} outside [1, {expected.max_samples}] (--max-samples)")
    if header.manifest:
        if [(t.name, tuple(t.shape)) for t in header.manifest] != [(t.name, tuple(t.shape)) for t in expected.manifest]:
            raise RejectedUpdate("wrong-manifest", "tensor manifest does not match the global model")
    elif header.manifest_sha256 != W.manifest_sha256(expected.manifest):
        raise RejectedUpdate("wrong-manifest", "tensor manifest digest missing or does not match the global model")


def update_norm(delta: Mapping[str, np.ndarray | SparseTensor]) -> float:
    """L2 norm in float64 (float32 squares of 3e38 overflow); inf or nan when any value is not finite."""
    total = 0.0
    for value in delta.values():
        values = value.values if isinstance(value, SparseTensor) else value
        total += float(np.dot(values.reshape(-1).astype(np.float64), values.reshape(-1).astype(np.float64)))
    return float(np.sqrt(total))


def check_update(delta: Mapping[str, np.ndarray | SparseTensor], max_norm: float) -> float:
    """The update's norm, if it is finite and within the bound."""
    norm = update_norm(delta)
    if not np.isfinite(norm):
        raise RejectedUpdate("non-finite", "update holds NaN or Inf values (or values whose squares overflow)")
    if norm > max_norm:
        raise RejectedUpdate("norm-bound", f"update L2 norm {norm:.4g} over the bound {max_norm:.4g} (--max-update-norm)")
    return norm
