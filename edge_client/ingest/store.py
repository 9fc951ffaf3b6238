"""The local dataset store: ingested images as one memory-mappable uint8 file plus a de-identified index.

On disk (a folder)::

    store.json   {"schema_version": 1, "kind": "fedge-dicom-store", "image_size": S, "channels": C}
    salt         32 random bytes (hex), made once per store, mode 0600; never leaves the device
    images.u8    raw uint8, C order, N x S x S (x 3 when channels == 3); np.memmap-able
    index.csv    uid_hash,frame,label,split,rows,cols   one line per image, in images.u8 order
    quarantine/  files that could not be ingested, each with a one-line .reason file

The index holds no DICOM value: uid_hash is HMAC-SHA256(salt, SOPInstanceUID), so a hash cannot be
matched against a UID list without the salt. Appends are crash-safe: image bytes are written and
synced before the index line that commits them; on open, bytes past the last index line are cut.
Writers (one-shot ingest, watch, the SCP's threads, other processes) serialise on a file lock.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.ingest.reader import Instance
from fedge.files import atomic_write_bytes, fsync_dir

SCHEMA_VERSION = 1
KIND = "fedge-dicom-store"
SPLITS = ("train", "val", "test")
_SPLIT_EDGES = (0.8, 0.9)  # train 80 %, val 10 %, test 10 % of instances, by hash
_INDEX_HEADER = "uid_hash,frame,label,split,rows,cols\n"
UNLABELLED = -1


def is_store(path: str | os.PathLike[str]) -> bool:
    """True where `path` is a folder made by DatasetStore.create (the agent's --data-dir check)."""
    meta = Path(path) / "store.json"
    try:
        return json.loads(meta.read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class IndexRow:
    """One stored image: nothing in it identifies a patient, a study or an instance."""

    uid_hash: str
    frame: int
    label: int
    split: str
    rows: int
    cols: int

    def to_line(self) -> str:
        return f"{self.uid_hash},{self.frame},{self.label},{self.split},{self.rows},{self.cols}\n"


def split_for(uid_hash: str) -> str:
    """Deterministic split from the salted hash; every frame of an instance lands in the same split."""
    u = int(uid_hash[:8], 16) / 2**32
    return SPLITS[0] if u < _SPLIT_EDGES[0] else SPLITS[1] if u < _SPLIT_EDGES[1] else SPLITS[2]


class DatasetStore:
    """Append-only image store with a de-identified index. Use `create` or `open`, not the constructor."""

    def __init__(self, root: Path, image_size: int, channels: int, salt: bytes) -> None:
        self.root = root
        self.image_size = image_size
        self.channels = channels
        self._salt = salt
        self._rows: list[IndexRow] = []
        self._keys: set[tuple[str, int]] = set()
        self._index_offset = 0  # bytes of index.csv already parsed
        self._lock = threading.Lock()
        self._refresh()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], image_size: int, channels: int = 1) -> "DatasetStore":
        """Make a new, empty store; refuses a folder that already has files in it."""
        root = Path(path)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: use 1 (grayscale) or 3 (RGB)")
        if not 8 <= image_size <= 1024:
            raise ValueError(f"image_size={image_size}: use a task input size between 8 and 1024")
        if root.exists() and any(root.iterdir()):
            hint = "open it with DatasetStore.open" if is_store(root) else "choose an empty or new folder"
            raise FileExistsError(f"{root} is not empty: {hint}")
        root.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent)
        # Each file synced and renamed into place (atomic_write_bytes makes them 0600): a power cut
        # never leaves a store.json beside an empty salt, which would make every hash unreproducible.
        atomic_write_bytes(root / "salt", secrets.token_hex(32).encode(), exclusive=True)  # a second creator fails
        atomic_write_bytes(root / "images.u8", b"")
        atomic_write_bytes(root / "index.csv", _INDEX_HEADER.encode())
        meta = {"schema_version": SCHEMA_VERSION, "kind": KIND, "image_size": image_size, "channels": channels}
        atomic_write_bytes(root / "store.json", (json.dumps(meta, indent=2) + "\n").encode())  # last: a half-made folder is never a store
        return cls.open(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "DatasetStore":
        """Open an existing store (made by `create` or `fedge ingest`)."""
        root = Path(path)
        if not is_store(root):
            raise FileNotFoundError(f"{root} is not a fedge dataset store: make one with `fedge ingest DIR --store {root}`")
        meta = json.loads((root / "store.json").read_text())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{root}/store.json: schema_version {meta.get('schema_version')!r}, this fedge reads {SCHEMA_VERSION}")
        for key in ("image_size", "channels"):
            if key not in meta:
                raise ValueError(f"{root}/store.json: missing {key!r}; the store is damaged, re-ingest into a new one")
        salt = bytes.fromhex((root / "salt").read_text().strip())
        return cls(root, int(meta["image_size"]), int(meta["channels"]), salt)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], image_size: int | None, channels: int | None) -> "DatasetStore":
        """Open the store at `path`, checking it matches the requested shape, or make it (28 x 28 x 1 unless given)."""
        if not is_store(path):
            return cls.create(path, image_size or 28, channels or 1)
        store = cls.open(path)
        for name, want, have in (("image size", image_size, store.image_size), ("channels", channels, store.channels)):
            if want is not None and want != have:
                raise ValueError(f"{path} holds {name} {have}, not {want}: drop the option or use a new --store")
        return store

    # --- writing ------------------------------------------------------------------------------
    def hash_uid(self, uid: str) -> str:
        """Salted hash of a UID; the only form in which an instance is named on disk."""
        return hmac.new(self._salt, uid.encode("ascii", "replace"), hashlib.sha256).hexdigest()

    def contains(self, sop_instance_uid: str) -> bool:
        """Whether an instance is stored already (checked before decoding, so re-runs are cheap)."""
        with self._lock:
            self._refresh()
            return (self.hash_uid(sop_instance_uid), 0) in self._keys

    def add(self, instance: Instance, label: int = UNLABELLED) -> int:
        """Append every frame of `instance`; returns how many were new (0: already stored)."""
        return self.add_many([(instance, label)])[0]

    def add_many(self, items: list[tuple[Instance, int]]) -> list[int]:
        """Append several instances in one commit (two fsyncs in all); new images per item, 0 for a duplicate.

        One commit per instance is what the SCP needs before it acknowledges; a folder ingest, whose
        sources stay on disk, batches and is several times faster.
        """
        shape = (self.image_size, self.image_size) + ((3,) if self.channels == 3 else ())
        for instance, label in items:
            if instance.images.dtype != np.uint8 or instance.images.shape[1:] != shape:
                raise ValueError(
                    f"images {instance.images.shape} {instance.images.dtype} do not fit this store "
                    f"(N, {', '.join(map(str, shape))}) uint8: read them with ReadConfig(image_size={self.image_size}, channels={self.channels})"
                )
            if label < UNLABELLED:
                raise ValueError(f"label={label}: use a class index >= 0, or {UNLABELLED} for unlabelled")
        with self._lock, self._file_lock():
            self._refresh()
            keys, rows, chunks, added = set(self._keys), [], [], []
            for instance, label in items:
                uid_hash = self.hash_uid(instance.sop_instance_uid)
                new = [f for f in range(len(instance.images)) if (uid_hash, f) not in keys]
                keys.update((uid_hash, f) for f in new)
                split = split_for(uid_hash)
                rows += [IndexRow(uid_hash, f, label, split, instance.rows, instance.cols) for f in new]
                chunks.append(np.ascontiguousarray(instance.images[new]).tobytes())
                added.append(len(new))
            if rows:
                self._append(b"".join(chunks), "".join(r.to_line() for r in rows))
            return added

    def _append(self, image_bytes: bytes, index_lines: str) -> None:
        """Image bytes first and synced, then the index lines that commit them (caller holds the locks)."""
        with open(self.root / "images.u8", "r+b") as fh:
            fh.truncate(len(self._rows) * self._bytes_per_image)  # cut bytes a crash left uncommitted
            fh.seek(0, io.SEEK_END)
            fh.write(image_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        with open(self.root / "index.csv", "r+", encoding="ascii") as fh:
            fh.truncate(self._index_offset)  # drop a line a crash tore in half
            fh.seek(self._index_offset)
            fh.write(index_lines)
            fh.flush()
            os.fsync(fh.fileno())
        self._refresh()

    # --- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._rows)

    @property
    def rows(self) -> list[IndexRow]:
        with self._lock:
            self._refresh()
            return list(self._rows)

    def images(self) -> np.ndarray:
        """All committed images, memory-mapped read-only: (N, S, S) or (N, S, S, 3) uint8."""
        n = len(self)
        shape = (n, self.image_size, self.image_size) + ((3,) if self.channels == 3 else ())
        if n == 0:
            return np.zeros(shape, dtype=np.uint8)
        return np.memmap(self.root / "images.u8", dtype=np.uint8, mode="r", shape=shape)

    def as_arrays(self, labelled_only: bool = True) -> dict[str, np.ndarray]:
        """MedMNIST layout: `<split>_images` (n, S, S[, 3]) uint8 and `<split>_labels` (n, 1) int64.

        labelled_only=False keeps unlabelled images too (label -1), for self-supervised tasks.
        """
        rows = self.rows
        images = self.images()[: len(rows)]
        labels = np.array([r.label for r in rows], dtype=np.int64)
        splits = np.array([r.split for r in rows])
        out: dict[str, np.ndarray] = {}
        for split in SPLITS:
            keep = (splits == split) & ((labels >= 0) if labelled_only else True)
            idx = np.flatnonzero(keep)
            out[f"{split}_images"] = np.asarray(images[idx])
            out[f"{split}_labels"] = labels[idx].reshape(-1, 1)
        return out

    # --- internals ----------------------------------------------------------------------------
    @property
    def _bytes_per_image(self) -> int:
        return self.image_size * self.image_size * self.channels

    def _file_lock(self) -> "_FileLock":
        return _FileLock(self.root / ".lock")

    def _refresh(self) -> None:
        """Parse index lines other writers committed since we last looked; drop a torn last line."""
        path = self.root / "index.csv"
        with open(path, "rb") as fh:
            fh.seek(self._index_offset)
            tail = fh.read()
        end = tail.rfind(b"\n") + 1
        if end == 0:
            return
        for rec in csv.reader(tail[:end].decode("ascii").splitlines()):
            if rec == _INDEX_HEADER.strip().split(","):
                continue
            row = IndexRow(rec[0], int(rec[1]), int(rec[2]), rec[3], int(rec[4]), int(rec[5]))
            self._rows.append(row)
            self._keys.add((row.uid_hash, row.frame))
        self._index_offset += end


class _FileLock:
    """Exclusive flock on a lock file, so separate processes (ingest + SCP) append in turn."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
