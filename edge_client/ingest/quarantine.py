"""Quarantine: bad inputs kept on the device for a person to look at, each with a one-line reason.

Files are named `<sha256 prefix>-<original name>` so quarantining the same bytes twice (a re-run of a
one-shot ingest) keeps one copy; `<name>.reason` holds `<code>: <detail>`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from edge_client.ingest.errors import QuarantineError
from fedge.files import file_digest


class Quarantine:
    """The `quarantine/` folder of a store."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def put_file(self, source: Path, error: QuarantineError, move: bool) -> Path:
        """Copy (one-shot ingest: the source folder is never modified) or move (watched inbox) a file."""
        digest = file_digest(source)
        target = self._target(digest, source.name)
        if move:
            shutil.move(os.fspath(source), target)
        elif not target.exists():
            shutil.copyfile(source, target)
        self._write_reason(target, error)
        return target

    def put_bytes(self, data: bytes, name: str, error: QuarantineError) -> Path:
        """Write a dataset received over the network (the SCP has no file to move)."""
        target = self._target(hashlib.sha256(data).hexdigest(), name)
        target.write_bytes(data)
        self._write_reason(target, error)
        return target

    def _target(self, digest: str, name: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"{digest[:16]}-{name}"

    @staticmethod
    def _write_reason(target: Path, error: QuarantineError) -> None:
        target.with_name(target.name + ".reason").write_text(f"{error.reason.value}: {error.detail}\n")
