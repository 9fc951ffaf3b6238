"""Decoding and checking updates off the round loop: the envelope, signature, header checks, codec
decode and norm of an update cost milliseconds of Python per update (16 ms for a top-1% update of
the 1.2M ResNet), and a thousand sites finishing together queue seconds of them behind each other.

`UpdateIntake` runs `decode_update` inline (workers=0, the default) or in a pool of worker
processes (`--decode-workers N`), at most `max_pending` at once: when that many are in flight the
round loop stops taking messages off the session's queue (itself bounded by bytes, refusing and
counting beyond), so memory stays bounded however fast updates arrive. Results come back in any
order; the round loop applies the nonce check and counts them, and the strategies sum in client
order, so the aggregate does not depend on which worker finished first."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from compression import CodecError
from fedge.protocol import ProtocolError
from fedge.protocol.signing import SignatureError, Verifier
from fedge.rounds import Expected, RejectedUpdate, Update, read_update
from server.validation import check_head_stats, check_update


@dataclass(frozen=True)
class Decoded:
    """One update's outcome: the decoded update and its norm, or the refusal (kind, reason)."""

    round: int
    client: str
    update: Update | None
    norm: float = 0.0
    refusal: tuple[str, str] | None = None


def decode_update(data: bytes, rnd: int, client: str, expected: Expected, verifier: Verifier | None, max_norm: float) -> Decoded:
    """Every wire check and the server's norm policy (a calibration round's statistics policy);
    never raises for what a sender got wrong."""
    try:
        update = read_update(data, topic_client=client, expected=expected, verifier=verifier)
        if expected.head_stats:
            return Decoded(rnd, client, update, check_head_stats(update.delta, update.header.num_samples))
        return Decoded(rnd, client, update, check_update(update.delta, max_norm))
    except SignatureError as exc:
        return Decoded(rnd, client, None, refusal=("bad-signature", str(exc)))
    except RejectedUpdate as exc:
        return Decoded(rnd, client, None, refusal=(exc.kind, exc.reason))
    except (ProtocolError, CodecError) as exc:
        return Decoded(rnd, client, None, refusal=("bad-envelope", str(exc)))


_worker_verifier: Verifier | None = None


def _init_worker(trusted_keys: str | None) -> None:
    global _worker_verifier
    _worker_verifier = Verifier.from_dir(trusted_keys) if trusted_keys else None


def _ready() -> None:
    """Nothing: submitting it starts a worker."""


def _decode_in_worker(data: bytes, rnd: int, client: str, expected: Expected, max_norm: float) -> Decoded:
    try:
        return decode_update(data, rnd, client, expected, _worker_verifier, max_norm)
    except Exception as exc:  # a bug or an input nobody foresaw: counted by the round loop, the worker lives on
        return Decoded(rnd, client, None, refusal=("handler-error", f"{type(exc).__name__}: {exc}"))


class UpdateIntake:
    """Inline (workers=0) or a process pool; `submit` then `collect` (completed results, any order)."""

    def __init__(self, workers: int, *, verifier: Verifier | None, trusted_keys: Path | None, max_norm: float, max_pending: int = 0):
        if workers < 0:
            raise ValueError(f"decode workers must be >= 0, got {workers}")
        self.workers = workers
        self.max_norm = max_norm
        self.verifier = verifier
        self.max_pending = max_pending or max(1, 4 * workers)
        self._pending: list[Future[Decoded]] = []
        self._done: list[Decoded] = []
        self._pool: ProcessPoolExecutor | None = None
        if workers:
            # forkserver: the round server runs paho's and the dashboard's threads; forking it could copy a held lock.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["server.intake"])
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                             initargs=(str(trusted_keys) if trusted_keys else None,))  # fmt: skip
            for _ in range(workers):  # start them now, while the server waits for sites, not at the first update
                self._pool.submit(_ready)

    @property
    def full(self) -> bool:
        """No more submissions until `collect` has taken some results (the caller stops reading)."""
        return len(self._pending) >= self.max_pending

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(self, data: bytes, rnd: int, client: str, expected: Expected) -> None:
        if self._pool is None:
            self._done.append(decode_update(data, rnd, client, expected, self.verifier, self.max_norm))
            return
        self._pending.append(self._pool.submit(_decode_in_worker, data, rnd, client, expected, self.max_norm))

    def collect(self, timeout: float = 0.0) -> list[Decoded]:
        """What has finished; waits up to `timeout` for the first when nothing has."""
        if self._pending and not self._done and timeout > 0:
            from concurrent.futures import FIRST_COMPLETED, wait

            wait(self._pending, timeout=timeout, return_when=FIRST_COMPLETED)
        still = []
        for future in self._pending:
            if future.done():
                self._done.append(future.result())
            else:
                still.append(future)
        self._pending = still
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
