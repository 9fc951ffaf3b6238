"""File helpers every part shares: crash-safe writes and content digests."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename, a new or removed file) to disk.

    A rename is durable only once its directory is synced; without it, a power cut can bring back
    the old name or lose the new file. Platforms without directory fds (Windows) skip silently.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (OSError, AttributeError):
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on a directory: nothing more can be done
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Write-then-rename so a crash never leaves a half-written file under the final name.

    The data is synced before the rename and the folder after it, so once this returns the new
    content survives a power cut. The file is made with mode 0600 (tempfile's), whatever was there.
    exclusive=True raises FileExistsError instead of replacing a file already there (two processes
    creating the same store: one wins, the other is told), by hard-linking the temp file into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a file the same way: to a temporary name, synced, renamed, folder synced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def durable_move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a file and sync both folders; across filesystems, copy durably then remove the source."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        atomic_copy_file(source, target)
        source.unlink()
    else:
        fsync_dir(target.parent)
    fsync_dir(source.parent)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (DICOM series and datasets can be large)."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
