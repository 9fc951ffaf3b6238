"""Time that tests move on instead of waiting for: a round server's deadlines read `SteppedClock`."""

from __future__ import annotations

import time
from collections.abc import Callable


class SteppedClock:
    """Wall time that stands still until the test moves it: a deadline (or the server's wait for
    upload reports) passes only by `advance`, once the test has seen what it expects before it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    """A bound on how long the federation may take to get there, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
