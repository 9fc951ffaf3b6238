"""Every refused input is counted by reason and logged, without letting a flood flood the log."""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque


class Refusals:
    """Counts refusals by kind (a short fixed label such as "bad-signature"); logs the first
    `burst` of each kind in full, then every `every`-th with the running count."""

    def __init__(self, log: logging.Logger, burst: int = 20, every: int = 1000, keep: int = 1000):
        self.log = log
        self.burst = burst
        self.every = every
        self.counts: Counter[str] = Counter()
        self.recent: deque[tuple[str, str]] = deque(maxlen=keep)  # (kind, detail), for operators and tests
        self._lock = threading.Lock()  # paho's network thread refuses too (queue full, topic filter)

    def __call__(self, kind: str, detail: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            n = self.counts[kind]
            self.recent.append((kind, detail))
        if n <= self.burst:
            self.log.warning("refused (%s): %s", kind, detail)
        elif n % self.every == 0:
            self.log.warning("refused (%s) %d times so far; latest: %s", kind, n, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
