"""Link emulation in the transport: a token bucket per direction throttles MQTT payloads to a
profile's uplink/downlink, so a demo round's transfer time on one machine matches the projection
for the site's real link. Works everywhere (no `tc`/network namespaces, no root)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

DEFAULT_BURST_BYTES = 16 * 1024


class TokenBucket:
    """Rate limiter in bytes with a `burst_bytes` allowance for idle credit.

    `consume(n)` may take more than the burst: the bucket goes into debt and the caller sleeps until
    the debt would be paid, so back-to-back calls behave like a serial link of the given rate.
    Reservations are made under a lock and sleeps happen outside it, so concurrent callers queue
    fairly instead of all waking at once. A rate of `math.inf` never blocks (an unthrottled direction).
    `now` and `sleep` are the clock (tests pace bytes on a virtual one).
    """

    def __init__(
        self,
        rate_bits_per_s: float,
        burst_bytes: int = DEFAULT_BURST_BYTES,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_bits_per_s > 0:
            raise ValueError(f"rate_bits_per_s must be > 0 (use math.inf for no limit), got {rate_bits_per_s!r}")
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes must be >= 0, got {burst_bytes!r}")
        self.rate_bits_per_s = float(rate_bits_per_s)
        self.burst_bytes = int(burst_bytes)
        self._bytes_per_s = self.rate_bits_per_s / 8
        self._tokens = float(burst_bytes)
        self._now, self._sleep = now, sleep
        self._last = now()
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` of tokens now and return how many seconds the caller must wait before sending."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if math.isinf(self._bytes_per_s):
            return 0.0
        with self._lock:
            now = self._now()
            self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * self._bytes_per_s)
            self._last = now
            self._tokens -= nbytes
            return max(0.0, -self._tokens / self._bytes_per_s)

    def consume(self, nbytes: int) -> float:
        """Block until `nbytes` may go on the emulated link; returns the seconds slept."""
        delay = self.reserve(nbytes)
        if delay > 0:
            self._sleep(delay)
        return delay


class LinkEmulator:
    """One bucket per direction. The transport calls `uplink.consume(len(payload))` before each
    publish and `downlink.consume(n)` on each receipt. A `None` rate (no sourced figure in the
    profile) leaves that direction unthrottled."""

    def __init__(self, uplink_mbps: float | None, downlink_mbps: float | None, burst_bytes: int = DEFAULT_BURST_BYTES) -> None:
        for field, value in (("uplink_mbps", uplink_mbps), ("downlink_mbps", downlink_mbps)):
            if value is not None and not value > 0:
                raise ValueError(f"{field} must be > 0 or None (unthrottled), got {value!r}")
        self.uplink_mbps = uplink_mbps
        self.downlink_mbps = downlink_mbps
        self.uplink = TokenBucket(_bits_per_s(uplink_mbps), burst_bytes)
        self.downlink = TokenBucket(_bits_per_s(downlink_mbps), burst_bytes)

    def projected_seconds(self, uplink_bytes: int, downlink_bytes: int) -> tuple[float | None, float | None]:
        """Transfer time of the given bytes at the link's rates (None where a direction has no rate)."""
        up = None if self.uplink_mbps is None else uplink_bytes * 8 / (self.uplink_mbps * 1e6)
        down = None if self.downlink_mbps is None else downlink_bytes * 8 / (self.downlink_mbps * 1e6)
        return up, down


def _bits_per_s(mbps: float | None) -> float:
    return math.inf if mbps is None else mbps * 1e6
