"""One ingest path for every way images arrive (a folder, a watched inbox, the SCP) and its summary.

Each input is loaded, checked against the store (duplicates skip the decode), decoded, labelled and
committed; anything wrong with one input quarantines that input and the run goes on.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.uid import UID

from edge_client.ingest.errors import QuarantineError, Reason
from edge_client.ingest.labels import Labels
from edge_client.ingest.quarantine import DEFAULT_QUOTA_BYTES, Quarantine
from edge_client.ingest.reader import Instance, ReadConfig, load_dataset, read_dataset
from edge_client.ingest.store import DatasetStore

SUMMARY_SCHEMA_VERSION = 2  # 2: quarantine_full


class Outcome(str, Enum):
    INGESTED = "ingested"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class Result:
    """What became of one input, for a caller that answers a sender (the SCP's C-STORE status).

    kept is False for a quarantined input of which no copy was kept (the quarantine was full, or a
    transfer was cut off at the size cap): the sender must keep its own.
    """

    outcome: Outcome
    error: QuarantineError | None = None
    kept: bool = True


@dataclass(frozen=True)
class IngestSummary:
    """The `--report` JSON. ingested/duplicates/quarantined count inputs (files or received
    datasets); images counts what was added to the store (a multi-frame instance adds several).
    quarantined counts every bad input (by code in reasons); quarantine_full counts those of them
    that were refused but not kept, because the quarantine had reached its quota."""

    ingested: int
    quarantined: int
    reasons: dict[str, int]
    seconds: float
    images: int
    duplicates: int
    quarantine_full: int = 0
    schema_version: int = field(default=SUMMARY_SCHEMA_VERSION)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "IngestSummary":
        data = json.loads(text)
        if data.get("schema_version") not in (1, SUMMARY_SCHEMA_VERSION):
            raise ValueError(f"ingest summary schema_version {data.get('schema_version')!r}; this fedge reads 1 to {SUMMARY_SCHEMA_VERSION}")
        return cls(**{**data, "schema_version": SUMMARY_SCHEMA_VERSION})


class Ingestor:
    """Feeds inputs into one store; thread-safe, so the SCP's association threads can share it."""

    def __init__(self, store: DatasetStore, config: ReadConfig, labels: Labels | None = None, quarantine_bytes: int = DEFAULT_QUOTA_BYTES) -> None:
        if (config.image_size, config.channels) != (store.image_size, store.channels):
            raise ValueError(
                f"ReadConfig makes {config.image_size}px x {config.channels} images but {store.root} holds "
                f"{store.image_size}px x {store.channels}: match the store or use a new one"
            )
        self.store = store
        self.config = config
        self.labels = labels or Labels()
        self.quarantine = Quarantine(store.root / "quarantine", quarantine_bytes)
        self._lock = threading.Lock()
        self._outcomes: Counter[Outcome] = Counter()
        self._reasons: Counter[str] = Counter()
        self._images = 0
        self._quarantine_full = 0
        self._started = time.perf_counter()

    def ingest_file(self, path: Path, move_bad: bool) -> Result:
        """One file, committed before returning. move_bad=False copies a bad file to quarantine."""
        return self._commit_one(*self._prepare_file(path, move_bad))

    def ingest_bytes(self, data: bytes, name: str) -> Result:
        """A dataset received over the network (a Part 10 encoding), committed before returning,
        so the SCP acknowledges only what is on disk."""
        quarantine = lambda err: self.quarantine.put_bytes(data, name, err)  # noqa: E731
        load = lambda: load_dataset(io.BytesIO(data), self.config.limits)  # noqa: E731
        return self._commit_one(*self._prepare(load, None, quarantine))

    def refuse(self, error: QuarantineError) -> Result:
        """Count a bad input of which there is nothing to keep (a transfer cut off at the size cap)."""
        return self._count_bad(error, kept=False, quarantine_full=False)

    def ingest_paths(self, paths: Iterable[Path], progress: bool = True, batch: int = 32) -> IngestSummary:
        """One-shot ingest of many files with a progress bar; sources are only read, so a crash
        loses nothing and commits can be batched (one pair of fsyncs per `batch` instances)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        files = list(paths)
        pending: list[tuple[Instance, int]] = []
        columns = (TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("ingest", total=len(files))
            for path in files:
                pending += self._prepare_file(path, move_bad=False)[0]
                if len(pending) >= batch:
                    self._commit(pending)
                    pending = []
                bar.advance(task)
            self._commit(pending)
        return self.summary()

    def summary(self) -> IngestSummary:
        """Counts since this ingestor was made."""
        with self._lock:
            return IngestSummary(
                ingested=self._outcomes[Outcome.INGESTED],
                quarantined=self._outcomes[Outcome.QUARANTINED],
                reasons=dict(sorted(self._reasons.items())),
                seconds=round(time.perf_counter() - self._started, 3),
                images=self._images,
                duplicates=self._outcomes[Outcome.DUPLICATE],
                quarantine_full=self._quarantine_full,
            )

    def _prepare_file(self, path: Path, move_bad: bool) -> tuple[list[tuple[Instance, int]], Result]:
        quarantine = lambda err: self.quarantine.put_file(path, err, move=move_bad)  # noqa: E731
        return self._prepare(lambda: load_dataset(path, self.config.limits), path, quarantine)

    def _prepare(
        self, load: Callable[[], Dataset], source: Path | None, quarantine: Callable[[QuarantineError], Path | None]
    ) -> tuple[list[tuple[Instance, int]], Result]:
        """([(decoded instance, label)], INGESTED) to commit, or ([], what happened) for an input
        already stored or quarantined (counted here)."""
        try:
            item = self._decode(load, source)
        except QuarantineError as err:
            kept = quarantine(err) is not None
            return [], self._count_bad(err, kept, quarantine_full=not kept)
        if item is None:
            with self._lock:
                self._outcomes[Outcome.DUPLICATE] += 1
            return [], Result(Outcome.DUPLICATE)
        return [item], Result(Outcome.INGESTED)

    def _count_bad(self, err: QuarantineError, kept: bool, quarantine_full: bool) -> Result:
        with self._lock:
            self._outcomes[Outcome.QUARANTINED] += 1
            self._reasons[err.reason.value] += 1
            self._quarantine_full += quarantine_full
        return Result(Outcome.QUARANTINED, err, kept)

    def _decode(self, load: Callable[[], Dataset], source: Path | None) -> tuple[Instance, int] | None:
        """None for a known instance; QuarantineError for a bad input; OSError is the operator's."""
        try:
            ds = load()
            uid = str(ds.get("SOPInstanceUID", ""))
            if uid and UID(uid).is_valid and self.store.contains(uid):
                return None  # known already: skip the decode
            instance = read_dataset(ds, self.config)
            return instance, self.labels.label_for(instance, source)
        except (QuarantineError, OSError):
            raise  # OSError: disk full, permissions; nothing is wrong with the file, so stop and say so
        except Exception as exc:  # a header value the reader cannot use; one bad input never stops ingest
            raise QuarantineError(Reason.BAD_HEADER, f"{type(exc).__name__}: {exc}") from exc

    def _commit(self, pending: list[tuple[Instance, int]]) -> list[int]:
        if not pending:
            return []
        added = self.store.add_many(pending)
        with self._lock:
            for n in added:
                self._outcomes[Outcome.INGESTED if n else Outcome.DUPLICATE] += 1
                self._images += n
        return added

    def _commit_one(self, pending: list[tuple[Instance, int]], result: Result) -> Result:
        """Commit one input; an instance another writer stored meanwhile turns out a duplicate."""
        return Result(Outcome.DUPLICATE) if self._commit(pending) == [0] else result


def discover(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Every regular file under `folder` (sorted), skipping hidden files and the store itself."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder: pass the folder that holds the DICOM files")
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(path)
    return found
