"""Quarantine: bad inputs kept on the device for a person to look at, each with a one-line reason.

Files are named `<sha256 prefix>-<original name>` so quarantining the same bytes twice (a re-run of a
one-shot ingest) keeps one copy; `<name>.reason` holds `<code>: <detail>`.

The folder has a byte quota: a sender that streams garbage must not fill the disk the store and the
agent live on. When a file would not fit, it is not written (the sender or the inbox keeps it), the
caller is told (None), and a warning is logged. Every write is synced and renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from edge_client.ingest.errors import QuarantineError
from fedge.files import atomic_copy_file, atomic_write_bytes, durable_move, file_digest

DEFAULT_QUOTA_BYTES = 1 << 30
log = logging.getLogger(__name__)


class Quarantine:
    """The `quarantine/` folder of a store, holding at most `quota_bytes` (files and reason files).

    The count of bytes used is taken from the folder when made and kept up to date by this object;
    before refusing, the folder is measured again, so space that a person freed (or that another
    process used) is seen. Concurrent writers can pass the quota by the files in flight at most.
    """

    def __init__(self, root: str | os.PathLike[str], quota_bytes: int = DEFAULT_QUOTA_BYTES) -> None:
        if quota_bytes < 0:
            raise ValueError(f"quarantine quota {quota_bytes}: use 0 (keep nothing) or more bytes")
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self._used = self._measure()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def put_file(self, source: Path, error: QuarantineError, move: bool) -> Path | None:
        """Copy (one-shot ingest: the source folder is never modified) or move (watched inbox) a file.

        None when the quota leaves no room: nothing is written and the file stays where it is.
        """
        size = source.stat().st_size
        if size > self.quota_bytes:  # can never fit: say so without reading it for the digest
            self._fits(size, source.name, error)
            return None
        target = self._target(file_digest(source), source.name)
        if not self._reserve(target, size, error):
            return None
        if move:
            durable_move(source, target)
        elif not target.exists():
            atomic_copy_file(source, target)
        self._write_reason(target, error)
        return target

    def put_bytes(self, data: bytes, name: str, error: QuarantineError) -> Path | None:
        """Write a dataset received over the network (the SCP has no file to move); None when full."""
        target = self._target(hashlib.sha256(data).hexdigest(), name)
        if not self._reserve(target, len(data), error):
            return None
        if not target.exists():
            atomic_write_bytes(target, data)
        self._write_reason(target, error)
        return target

    def _target(self, digest: str, name: str) -> Path:
        return self.root / f"{digest[:16]}-{name}"

    def _fits(self, size: int, name: str, error: QuarantineError, claim: bool = False) -> bool:
        """Whether `size` more bytes fit the quota (measuring the folder again before saying no);
        claim=True also counts them as used, in the same locked step."""
        with self._lock:
            if self._used + size > self.quota_bytes:
                self._used = self._measure()
            if self._used + size <= self.quota_bytes:
                self._used += size if claim else 0
                return True
            used = self._used
        log.warning(
            "quarantine full (%d of %d bytes used): %s (%d bytes, %s) not kept; free space in %s or raise --quarantine-mb",
            used,
            self.quota_bytes,
            name,
            size,
            error.reason.value,
            self.root,
        )
        return False

    def _reserve(self, target: Path, size: int, error: QuarantineError) -> bool:
        """Claim the bytes this put adds (none for bytes already kept under that name) if they fit."""
        new = (0 if target.exists() else size) + (0 if _reason_path(target).exists() else _reason_bytes(error))
        return self._fits(new, target.name, error, claim=True)

    def _write_reason(self, target: Path, error: QuarantineError) -> None:
        atomic_write_bytes(_reason_path(target), _reason_text(error).encode())

    def _measure(self) -> int:
        try:
            with os.scandir(self.root) as entries:
                return sum(e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return 0


def _reason_path(target: Path) -> Path:
    return target.with_name(target.name + ".reason")


def _reason_text(error: QuarantineError) -> str:
    return f"{error.reason.value}: {error.detail}\n"


def _reason_bytes(error: QuarantineError) -> int:
    return len(_reason_text(error).encode())
