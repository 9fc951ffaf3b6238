"""Watch an inbox folder: ingest files as they land; bad ones are moved out to quarantine.

Polling (no inotify dependency, works on network shares): a file is taken once its size and mtime
are the same on two polls in a row, so a half-copied file is never read. Good files stay where they
are (the inbox owner decides when to delete them); a restart re-reads them cheaply, because known
instances are recognised from the header before any pixel decode.
"""

from __future__ import annotations

import threading
from pathlib import Path

from edge_client.ingest.pipeline import Ingestor, discover


def watch(ingestor: Ingestor, inbox: Path, stop: threading.Event, poll_s: float = 1.0) -> None:
    """Run until `stop` is set (Ctrl-C in the CLI, an event in tests)."""
    seen: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) at the last poll
    done: dict[Path, tuple[int, int]] = {}  # path -> stat when ingested; a rewritten file is read again
    while not stop.is_set():
        for path in discover(inbox, exclude=ingestor.store.root):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed between listing and stat
            sig = (st.st_size, st.st_mtime_ns)
            if done.get(path) == sig:
                continue
            if seen.get(path) != sig:
                seen[path] = sig  # still arriving, or new: look again next poll
                continue
            try:
                ingestor.ingest_file(path, move_bad=True)
            except FileNotFoundError:
                pass  # taken away by its owner while we read it
            done[path] = sig
            seen.pop(path, None)
        stop.wait(poll_s)
