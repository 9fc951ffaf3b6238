"""Runs one case under a time limit with `tracemalloc` on, classifies what happened, and shrinks
inputs that raise unexpectedly."""

from __future__ import annotations

import signal
import time
import tracemalloc
from dataclasses import dataclass

from fuzzlib.case import Case, Caught, Target


class CaseTimeout(BaseException):
    """Raised by the alarm: a BaseException, so no handler's `except Exception` swallows it."""


@dataclass(frozen=True)
class Result:
    outcome: str  # accepted | rejected | unexpected | escape | caught | timeout
    ms: float
    traced_bytes: int
    error: str = ""

    @property
    def signature(self) -> str:
        """What makes two failures the same finding: the outcome and the exception type."""
        return f"{self.outcome}:{self.error.split(':', 1)[0]}"


def _alarm(signum: int, frame: object) -> None:
    raise CaseTimeout()


def run_case(target: Target, case: Case, timeout_s: float = 30.0, trace: bool = True) -> Result:
    """Execute `case`; `trace` measures the traced peak (tracemalloc slows Python code ~2x)."""
    return run_prepared(target, target.prepare(case), timeout_s, trace)


def run_prepared(target: Target, prepared: object, timeout_s: float = 30.0, trace: bool = True) -> Result:
    """Execute what `target.prepare` built: only this is timed and traced."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    outcome, error = "unexpected", ""
    try:
        outcome = "accepted" if target.execute(prepared) else "rejected"
    except target.expected:
        outcome = "rejected"
    except CaseTimeout:
        outcome = "timeout"
    except Caught as exc:
        outcome, error = "caught", str(exc)
    except Exception as exc:
        outcome = "escape" if not target.expected else "unexpected"
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ms = (time.perf_counter() - start) * 1000
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
    return Result(outcome, ms, peak, error)


def minimize(target: Target, case: Case, signature: str, max_runs: int = 300, max_seconds: float = 30.0) -> Case:
    """The shortest blob found by deleting ever smaller slices that still fails the same way."""
    deadline = time.monotonic() + max_seconds
    blob, runs, step = case.blob, 0, max(1, len(case.blob) // 2)
    while step >= 1 and runs < max_runs and time.monotonic() < deadline:
        i, shrunk = 0, False
        while i < len(blob) and runs < max_runs and time.monotonic() < deadline:
            candidate = case.with_blob(blob[:i] + blob[i + step :])
            runs += 1
            if run_case(target, candidate, trace=False).signature == signature:
                blob, shrunk = candidate.blob, True
            else:
                i += step
        if not shrunk:
            step //= 2
    return case.with_blob(blob)
