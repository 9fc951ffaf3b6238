"""Checks an update must pass before it counts; each failure has a short reason that is logged."""

from __future__ import annotations

from collections.abc import Collection

from compression import TensorSpec
from fedge import weights as W
from fedge.protocol import EnvelopeHeader


class RejectedUpdate(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def validate_header(
    header: EnvelopeHeader,
    *,
    topic_client: str,
    federation: str,
    current_round: int,
    selected: Collection[str],
    codec: str,
    manifest: list[TensorSpec],
) -> None:
    if header.kind != "update":
        raise RejectedUpdate(f"envelope kind {header.kind!r} on an update topic")
    if header.federation != federation:
        raise RejectedUpdate(f"wrong federation {header.federation!r}")
    if header.sender != topic_client:
        raise RejectedUpdate(f"sender {header.sender!r} does not match topic client {topic_client!r}")
    if header.round != current_round:
        raise RejectedUpdate(f"{'stale' if header.round < current_round else 'future'} round {header.round} (current {current_round})")
    if selected and header.sender not in selected:
        raise RejectedUpdate(f"client {header.sender!r} was not selected for round {current_round}")
    if header.codec != codec:
        raise RejectedUpdate(f"codec {header.codec!r} differs from the announced {codec!r}")
    if header.num_samples < 1:
        raise RejectedUpdate("update trained on zero samples")
    if header.manifest:
        if [(t.name, tuple(t.shape)) for t in header.manifest] != [(t.name, tuple(t.shape)) for t in manifest]:
            raise RejectedUpdate("tensor manifest does not match the global model")
    elif header.manifest_sha256 != W.manifest_sha256(manifest):
        raise RejectedUpdate("tensor manifest digest missing or does not match the global model")
