"""Time that tests move on instead of waiting for: a round server's deadlines read `SteppedClock`."""

from __future__ import annotations

import time
from collections.abc import Callable


class SteppedClock:
    """Wall time plus whatever the test skipped: `advance` moves a round past its deadline at once,
    once the test has seen everything it expects before that deadline."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    """A bound on how long the federation may take to get there, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
