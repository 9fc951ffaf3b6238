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
from edge_client.ingest.quarantine import Quarantine
from edge_client.ingest.reader import Instance, ReadConfig, load_dataset, read_dataset
from edge_client.ingest.store import DatasetStore

SUMMARY_SCHEMA_VERSION = 1


class Outcome(str, Enum):
    INGESTED = "ingested"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class IngestSummary:
    """The `--report` JSON. ingested/duplicates/quarantined count inputs (files or received
    datasets); images counts what was added to the store (a multi-frame instance adds several)."""

    ingested: int
    quarantined: int
    reasons: dict[str, int]
    seconds: float
    images: int
    duplicates: int
    schema_version: int = field(default=SUMMARY_SCHEMA_VERSION)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "IngestSummary":
        data = json.loads(text)
        if data.get("schema_version") != SUMMARY_SCHEMA_VERSION:
            raise ValueError(f"ingest summary schema_version {data.get('schema_version')!r}; this fedge reads {SUMMARY_SCHEMA_VERSION}")
        return cls(**data)


class Ingestor:
    """Feeds inputs into one store; thread-safe, so the SCP's association threads can share it."""

    def __init__(self, store: DatasetStore, config: ReadConfig, labels: Labels | None = None) -> None:
        if (config.image_size, config.channels) != (store.image_size, store.channels):
            raise ValueError(
                f"ReadConfig makes {config.image_size}px x {config.channels} images but {store.root} holds "
                f"{store.image_size}px x {store.channels}: match the store or use a new one"
            )
        self.store = store
        self.config = config
        self.labels = labels or Labels()
        self.quarantine = Quarantine(store.root / "quarantine")
        self._lock = threading.Lock()
        self._outcomes: Counter[Outcome] = Counter()
        self._reasons: Counter[str] = Counter()
        self._images = 0
        self._started = time.perf_counter()

    def ingest_file(self, path: Path, move_bad: bool) -> None:
        """One file, committed before returning. move_bad=False copies a bad file to quarantine."""
        self._commit(self._prepare_file(path, move_bad))

    def ingest_bytes(self, data: bytes, name: str) -> None:
        """A dataset received over the network (a Part 10 encoding), committed before returning,
        so the SCP acknowledges only what is on disk."""
        quarantine = lambda err: self.quarantine.put_bytes(data, name, err)  # noqa: E731
        self._commit(self._prepare(lambda: load_dataset(io.BytesIO(data)), None, quarantine))

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
                pending += self._prepare_file(path, move_bad=False)
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
            )

    def _prepare_file(self, path: Path, move_bad: bool) -> list[tuple[Instance, int]]:
        return self._prepare(lambda: load_dataset(path), path, lambda err: self.quarantine.put_file(path, err, move=move_bad))

    def _prepare(
        self, load: Callable[[], Dataset], source: Path | None, quarantine: Callable[[QuarantineError], object]
    ) -> list[tuple[Instance, int]]:
        """[(decoded instance, label)], or [] for an input already stored or quarantined (counted here)."""
        try:
            item = self._decode(load, source)
        except QuarantineError as err:
            quarantine(err)
            with self._lock:
                self._outcomes[Outcome.QUARANTINED] += 1
                self._reasons[err.reason.value] += 1
            return []
        if item is None:
            with self._lock:
                self._outcomes[Outcome.DUPLICATE] += 1
            return []
        return [item]

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

    def _commit(self, pending: list[tuple[Instance, int]]) -> None:
        if not pending:
            return
        added = self.store.add_many(pending)
        with self._lock:
            for n in added:
                self._outcomes[Outcome.INGESTED if n else Outcome.DUPLICATE] += 1
                self._images += n


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
