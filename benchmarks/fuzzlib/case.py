"""What one fuzz case is, and what a target does with it."""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    """`blob` is the mutated input (what minimisation shrinks); `meta` the small JSON-able context
    the target rebuilds the rest from (a topic, a codec spec, a manifest)."""

    target: str
    scenario: str
    blob: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes an attacker sends for this case: the blob plus its context."""
        return len(self.blob) + len(json.dumps(self.meta))

    def with_blob(self, blob: bytes) -> Case:
        return Case(self.target, self.scenario, blob, self.meta)


class Caught(Exception):
    """A handler's safety net caught an exception (counted as `handler-error`), or a decoder
    failure surfaced as a bare builtin inside a handler: not an escape, still a finding."""


class Target(ABC):
    """A decoder (only `expected` may escape it) or a message handler (`expected` is empty:
    nothing may escape)."""

    name: str
    weight: float  # share of the campaign's cases
    expected: tuple[type[BaseException], ...] = ()

    @abstractmethod
    def generate(self, rng: random.Random) -> Case:
        """A new case from the seeded generator."""

    def prepare(self, case: Case) -> Any:
        """What `execute` takes, built before the case is timed and traced (e.g. the messages)."""
        return case

    @abstractmethod
    def execute(self, prepared: Any) -> bool:
        """Run the prepared case: True when the input was accepted, False when it was refused."""

    def input_bytes(self, prepared: Any) -> int:
        """What an attacker sends for this case (memory is measured against it)."""
        return prepared.size
