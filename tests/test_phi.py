"""PHI stays on the site: a federation on ingested real DICOM, every MQTT byte captured through Mosquitto.

Two sites ingest different real files with `fedge ingest` (site-1 labels by class folder, site-2 by
a labels CSV keyed on StudyInstanceUID; CT = 0, MR = 1), a `fedge server` and two `fedge agent`
processes run two rounds against a real Mosquitto, and a client subscribed to `#` records every
topic and payload the broker routes. The recorded traffic is then searched for

- every identifying DICOM value in the source files (names, IDs, dates, times, UIDs, institution,
  station, accession number, ...), as UTF-8 and as UTF-16 LE/BE, in every topic, every raw payload,
  every reassembled envelope, its decoded header and payload, and every zstd frame found anywhere;
- image pixels: any informative 32-byte window of the stored uint8 images, of their float32 form
  as the training step sees it, or of the source files' PixelData;

and the envelope headers the agents sent are checked against the allow-list (keys and metric names).
Messages on topics outside fedge/phi/ (another test's federation, should one share the broker) are
searched as raw bytes too, but not decoded. A second test feeds the same checker planted leaks (a
PatientID in a status JSON, a UID inside a zstd frame, 32 bytes of a stored image, an extra header
key, ...) and look-alikes that are not leaks, and checks it flags exactly the leaks.

Matching rules, chosen so a clean run cannot fail by chance:
- values shorter than 4 characters, or made of one repeated character ('----'), are not searched;
- a value under 12 characters made of digits, dots and hex letters (dates, times, numeric IDs)
  matches only as a whole token (no letter, digit or '.' on either side), so the SeriesTime '1050'
  does not match 0.10501 or the '...a1050f...' of a SHA-256 in a snapshot pointer;
- inside binary data (tensor payloads, decompressed frames, chunks) only needles of 8 bytes or more
  are searched (UTF-8 of values >= 8 characters, UTF-16 of every value): a 4-byte needle occurs by
  chance in megabytes of float bytes. Textual parts (topics, JSON messages, envelope headers) are
  searched with every needle;
- a pixel window counts when it has >= 4 distinct elements (bytes for uint8 images, 16-bit words for
  PixelData, floats for the float32 form): uniform air/background equals runs of zero or 1.0 in any
  weight tensor. The search indexes 16-byte blocks of the needle at 16-byte strides, so a window is
  found whenever its aligned 16-byte core is not a single repeated element.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zstandard
from data_fixtures import data_path

from fedge.protocol import (
    ALLOWED_METRICS,
    Chunk,
    ControlMessage,
    EnvelopeHeader,
    ProtocolError,
    Reassembler,
    StatusMessage,
    TensorEntry,
    Topics,
    decode_envelope,
    open_record,
)
from fedge.protocol.envelope import MAGIC as ENVELOPE_MAGIC

pytestmark = [pytest.mark.mosquitto, pytest.mark.filterwarnings("ignore::UserWarning")]

FEDGE = [sys.executable, "-m", "fedge.cli.main"]
FEDERATION = "phi"
SITES = ("site-1", "site-2")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SENTINEL_TOPIC = "phi-test/sentinel"

# Non-UID, non-PN, non-date elements that identify a patient, a visit, a person, a place or a device.
IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientAge",
        "MilitaryRank",
        "MedicalRecordLocator",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "RequestedProcedureID",
        "PerformedProcedureStepID",
        "ScheduledProcedureStepID",
        "AdmissionID",
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
        "SourceApplicationEntityTitle",
    }
)
DATE_TIME_VRS = ("DA", "DT", "TM")
STANDARD_UID_ROOT = "1.2.840.10008."  # transfer syntaxes and SOP classes: public constants, not identifying
_TOKEN_LIKE = re.compile(r"^[0-9A-Fa-f.]+$")  # could occur inside a number or a hex digest by chance
_WORD_BYTES = frozenset(b"0123456789.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


# ---------------------------------------------------------------------------------------------------
# What must not leave the site: values and pixels read from the real source files and the stores
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needle:
    label: str  # "PatientID='QIN-PROSTATE-01-0001' as utf-16-le": a failure names the element and the value
    data: bytes
    token: bool  # digits/hex letters/dots: counts only as a whole token, not inside a longer number or digest


def _element_values(elem: pydicom.dataelem.DataElement) -> list[str]:
    value = elem.value
    items = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    out = []
    for item in items:
        text = str(item).strip().strip("\x00").strip()
        if text:
            out.append(text)
    return out


def identifying_values(path: Path) -> list[tuple[str, str]]:
    """(keyword, value) for every identifying element of one DICOM file, file meta and sequences included."""
    ds = pydicom.dcmread(path, force=True)
    elements = list(ds.file_meta) if ds.file_meta is not None else []
    elements += list(ds.iterall())
    found = []
    for elem in elements:
        keyword = elem.keyword or str(elem.tag)
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "UN") or elem.tag == 0x7FE00010:
            continue
        wanted = elem.VR in ("PN", "UI") or elem.VR in DATE_TIME_VRS or (not elem.tag.is_private and keyword in IDENTIFYING_KEYWORDS)
        if not wanted:
            continue
        for text in _element_values(elem):
            if elem.VR == "UI" and text.startswith(STANDARD_UID_ROOT):
                continue
            forms = {text}
            if elem.VR == "PN":
                forms |= {part for group in text.split("=") for part in group.split("^")}
            if elem.VR == "TM" and "." in text:
                forms.add(text.split(".")[0])
            if elem.VR == "DA" and len(text) == 8 and text.isdigit():
                forms.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")  # the ISO form a careless exporter would write
            found += [(keyword, form.strip()) for form in forms if len(form.strip()) >= 4 and len(set(form.strip())) > 1]
    return found


def collect_values(files: list[Path]) -> dict[str, set[str]]:
    """value -> the keywords it was found under, over all files."""
    values: dict[str, set[str]] = defaultdict(set)
    for path in files:
        for keyword, value in identifying_values(path):
            values[value].add(keyword)
    return dict(values)


def needles_for(values: dict[str, set[str]]) -> list[Needle]:
    needles = []
    for value, keywords in sorted(values.items()):
        token = len(value) < 12 and bool(_TOKEN_LIKE.match(value))
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            try:
                data = value.encode(encoding)
            except UnicodeEncodeError:
                continue
            needles.append(Needle(f"{'/'.join(sorted(keywords))}={value!r} as {encoding}", data, token and encoding == "utf-8"))
    return needles


@dataclass(frozen=True)
class PixelSource:
    label: str
    data: bytes
    itemsize: int  # element width for the "informative window" rule: 1 uint8, 2 16-bit PixelData, 4 float32


# ---------------------------------------------------------------------------------------------------
# Fast search: needles indexed by 8/16-byte keys, each haystack buffer scanned at every byte offset
# ---------------------------------------------------------------------------------------------------
_K = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 16
WINDOW = 32


def words_at_every_offset(buf: bytes) -> np.ndarray:
    """The little-endian uint64 starting at each byte offset 0 .. len-8."""
    n = max(len(buf) - 7, 0)
    words = np.empty(n, dtype=np.uint64)
    for j in range(min(8, n)):
        words[j::8] = np.frombuffer(buf, dtype="<u8", count=(len(buf) - j) // 8, offset=j)
    return words


_FILTER_BITS = 24


def _prefilter(sorted_keys: np.ndarray) -> np.ndarray:
    """A one-hash Bloom filter over the keys' low bits: one memory access per haystack offset, not a binary search."""
    table = np.zeros(1 << _FILTER_BITS, dtype=bool)
    table[(sorted_keys & np.uint64((1 << _FILTER_BITS) - 1)).astype(np.int64)] = True
    return table


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
    """Indices into `keys` whose value occurs in `sorted_keys`."""
    if len(sorted_keys) == 0 or len(keys) == 0:
        return np.empty(0, dtype=np.int64)
    candidates = np.arange(len(keys)) if table is None else np.flatnonzero(table[(keys & np.uint64((1 << _FILTER_BITS) - 1)).astype(np.int64)])
    idx = np.minimum(np.searchsorted(sorted_keys, keys[candidates]), len(sorted_keys) - 1)
    return candidates[sorted_keys[idx] == keys[candidates]]


class PixelIndex:
    """16-byte blocks of every pixel source at 16-byte strides (one repeated element: left out), by fingerprint."""

    def __init__(self, sources: list[PixelSource]):
        self.sources = sources
        fps, owners, starts = [], [], []
        for i, source in enumerate(sources):
            n = len(source.data) // _BLOCK
            dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[source.itemsize]
            blocks = np.frombuffer(source.data, dtype=dtype, count=n * _BLOCK // source.itemsize).reshape(n, -1)
            keep = np.flatnonzero(~(blocks == blocks[:, :1]).all(axis=1))  # not one repeated element (air, white)
            words = np.frombuffer(source.data, dtype="<u8", count=n * 2).reshape(n, 2)[keep]
            fps.append(words[:, 0] ^ (words[:, 1] * _K))
            owners.append(np.full(len(keep), i, dtype=np.int32))
            starts.append(keep.astype(np.int64) * _BLOCK)
        fp = np.concatenate(fps) if fps else np.empty(0, np.uint64)
        order = np.argsort(fp, kind="stable")
        self.fp, self.owner, self.start = fp[order], np.concatenate(owners)[order], np.concatenate(starts)[order]
        self.table = _prefilter(self.fp)

    def scan(self, name: str, hay: bytes, words: np.ndarray, limit: int = 5) -> list[str]:
        if len(words) <= 8:
            return []
        fp = words[:-8] ^ (words[8:] * _K)
        hits = []
        for p in _lookup(self.fp, fp, self.table):
            lo, hi = np.searchsorted(self.fp, fp[p], "left"), np.searchsorted(self.fp, fp[p], "right")
            for k in range(lo, hi):
                source = self.sources[int(self.owner[k])]
                q = int(self.start[k])
                found = _common_window(source.data, q, hay, int(p), source.itemsize)
                if found is not None:
                    hits.append(f"{source.label} bytes {found}..{found + WINDOW} found in {name} at byte {int(p) - (q - found)}")
                    if len(hits) >= limit:
                        return hits
        return hits


def _common_window(needle: bytes, q: int, hay: bytes, p: int, itemsize: int) -> int | None:
    """Start (in the needle) of an informative 32-byte window shared around needle[q:q+16] == hay[p:p+16]."""
    if needle[q : q + _BLOCK] != hay[p : p + _BLOCK]:
        return None  # fingerprint collision
    left = 0
    while left < WINDOW - _BLOCK and q - left > 0 and p - left > 0 and needle[q - left - 1] == hay[p - left - 1]:
        left += 1
    right = 0
    while (
        right < WINDOW - _BLOCK and q + _BLOCK + right < len(needle) and p + _BLOCK + right < len(hay) and needle[q + _BLOCK + right] == hay[p + _BLOCK + right]
    ):
        right += 1
    for s in range(q - left, q + _BLOCK + right - WINDOW + 1):
        if s % itemsize == 0 and informative(needle[s : s + WINDOW], itemsize):
            return s
    return None


def informative(window: bytes, itemsize: int) -> bool:
    """At least 4 distinct elements: not air, not a uniform background, not a run of one float."""
    return len({window[i : i + itemsize] for i in range(0, len(window) - itemsize + 1, itemsize)}) >= 4


class ValueIndex:
    """Needles of 8 bytes or more, by their first 8 bytes (for binary data); all needles for text."""

    def __init__(self, needles: list[Needle]):
        self.needles = needles
        self.long = [n for n in needles if len(n.data) >= 8]
        keys = np.array([int.from_bytes(n.data[:8], "little") for n in self.long], dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.long = [self.long[i] for i in order]

    def scan_text(self, name: str, hay: bytes) -> list[str]:
        return [f"{n.label} in {name} at byte {pos}" for n in self.needles if (pos := find_value(hay, n)) >= 0]

    def scan_binary(self, name: str, hay: bytes, words: np.ndarray) -> list[str]:
        hits = []
        for p in _lookup(self.keys, words):
            lo, hi = np.searchsorted(self.keys, words[p], "left"), np.searchsorted(self.keys, words[p], "right")
            for needle in self.long[lo:hi]:
                if hay.startswith(needle.data, int(p)) and _delimited(hay, int(p), needle):
                    hits.append(f"{needle.label} in {name} at byte {int(p)}")
        return hits


def _delimited(hay: bytes, pos: int, needle: Needle) -> bool:
    if not needle.token:
        return True
    end = pos + len(needle.data)
    return (pos == 0 or hay[pos - 1] not in _WORD_BYTES) and (end >= len(hay) or hay[end] not in _WORD_BYTES)


def find_value(hay: bytes, needle: Needle) -> int:
    pos = hay.find(needle.data)
    while pos >= 0 and not _delimited(hay, pos, needle):
        pos = hay.find(needle.data, pos + 1)
    return pos


# ---------------------------------------------------------------------------------------------------
# The checker: takes captured (topic, payload) pairs, returns every finding
# ---------------------------------------------------------------------------------------------------
@dataclass
class Decoded:
    """What the checker could make of the captured traffic."""

    texts: list[tuple[str, bytes]] = field(default_factory=list)  # topics, JSON messages, envelope headers
    binaries: list[tuple[str, bytes]] = field(default_factory=list)  # raw payloads, envelopes, tensor payloads, zstd output
    envelopes: dict[str, tuple[dict, bytes]] = field(default_factory=dict)  # "update r1 site-1" -> (raw header, envelope)
    undecodable: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # topics outside fedge/<federation>/


def _zstd_frames(name: str, data: bytes, limit: int = 64 << 20) -> list[tuple[str, bytes]]:
    """Every zstd frame that starts anywhere in `data`, decompressed (and frames inside those, once more)."""
    out = []
    start = data.find(ZSTD_MAGIC)
    while start >= 0:
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data[start:]), read_across_frames=False) as reader:
                plain = reader.read(limit)  # bounded: a magic number at random in float bytes can decode to garbage
            if plain:
                out.append((f"{name} zstd@{start}", plain))
        except zstandard.ZstdError:
            pass
        start = data.find(ZSTD_MAGIC, start + 1)
    return out


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def decode_traffic(messages: list[tuple[str, bytes]], federation: str = FEDERATION) -> Decoded:
    topics = Topics(federation)
    out = Decoded()
    transfers: dict[str, Reassembler] = defaultdict(Reassembler)
    for i, (topic, payload) in enumerate(messages):
        name = f"message {i} on {topic}"
        out.texts.append((f"topic of message {i}", topic.encode("utf-8")))
        out.binaries.append((name, payload))
        if not payload:
            continue
        if _is_json(payload):
            out.texts.append((name, payload))
        if not topic.startswith(topics.root + "/"):
            out.foreign.append(name)  # another federation sharing the broker: searched as raw bytes only
            continue
        try:
            info = topics.parse(topic)
        except ValueError:
            out.undecodable.append(f"{name}: not a {federation} topic")
            continue
        if info.kind in ("update", "global", "snapshot_chunk"):
            key = {"update": f"update r{info.round} {info.client}", "global": f"global r{info.round}", "snapshot_chunk": "snapshot"}[info.kind]
            try:
                chunk = Chunk.decode(payload)
                whole = transfers[key].add(key, chunk)
            except ProtocolError as exc:
                out.undecodable.append(f"{name}: {exc}")
                continue
            if whole is not None:
                key = f"{key} #{chunk.transfer.hex()[:8]}"
                out.binaries.append((f"envelope {key}", whole))
                _add_envelope(out, key, whole)
        elif not _is_json(payload):
            out.undecodable.append(f"{name}: {info.kind} payload is not JSON")
    for name, data in list(out.binaries):
        for frame in _zstd_frames(name, data):
            out.binaries.append(frame)
            out.binaries.extend(_zstd_frames(frame[0], frame[1]))
    return out


def _add_envelope(out: Decoded, key: str, whole: bytes) -> None:
    if not whole.startswith(ENVELOPE_MAGIC) or len(whole) < 8:
        out.undecodable.append(f"envelope {key}: no envelope magic")
        return
    head_len = int.from_bytes(whole[4:8], "big")
    head = whole[8 : 8 + head_len]
    out.texts.append((f"envelope header {key}", head))
    try:
        raw_header = json.loads(head)
    except ValueError:
        out.undecodable.append(f"envelope {key}: header is not JSON")
        return
    out.envelopes[key] = (raw_header, whole)
    try:
        env = decode_envelope(whole)
    except ProtocolError as exc:
        out.undecodable.append(f"envelope {key}: {exc}")
        return
    out.binaries.append((f"payload of {key}", env.payload))


def header_violations(key: str, raw: dict) -> list[str]:
    """What an update header carries beyond the allow-list (read from the raw JSON, not via pydantic)."""
    problems = []
    extra = set(raw) - set(EnvelopeHeader.model_fields)
    if extra:
        problems.append(f"{key}: header keys {sorted(extra)} are not in EnvelopeHeader")
    metrics = raw.get("metrics") or {}
    if not isinstance(metrics, dict) or set(metrics) - ALLOWED_METRICS:
        problems.append(f"{key}: metrics {sorted(metrics) if isinstance(metrics, dict) else metrics!r} outside ALLOWED_METRICS")
    for entry in raw.get("manifest") or ():
        if not isinstance(entry, dict) or set(entry) - set(TensorEntry.model_fields):
            problems.append(f"{key}: manifest entry {entry!r} has keys outside TensorEntry")
    if raw.get("kind") == "update" and raw.get("model") is not None:
        problems.append(f"{key}: an update carries a model description")
    try:
        EnvelopeHeader.model_validate(raw)
    except ValueError as exc:
        problems.append(f"{key}: header does not validate: {str(exc)[:200]}")
    return problems


def unique_buffers(buffers: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Drop buffers that are byte-for-byte inside another one (a chunk's frame output is a prefix of the envelope's)."""
    kept: list[tuple[str, bytes]] = []
    for name, data in sorted(buffers, key=lambda b: -len(b[1])):
        if not any(data in other for _, other in kept):
            kept.append((name, data))
    return kept


def findings(decoded: Decoded, values: ValueIndex, pixels: PixelIndex) -> tuple[list[str], list[str]]:
    """(DICOM values found, pixel windows found) anywhere in the decoded traffic."""
    value_hits, pixel_hits = [], []
    for name, text in decoded.texts:
        value_hits += values.scan_text(name, text)
    for name, data in unique_buffers(decoded.binaries + decoded.texts):
        words = words_at_every_offset(data)
        value_hits += values.scan_binary(name, data, words)
        pixel_hits += pixels.scan(name, data, words)
    return value_hits, pixel_hits


# ---------------------------------------------------------------------------------------------------
# Capture: one MQTT client on `#` for the whole federation
# ---------------------------------------------------------------------------------------------------
class Capture:
    def __init__(self, host: str, port: int):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._sentinel = threading.Event()
        # A persistent session: should the connection drop, the broker queues what we miss (QoS 1).
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="phi-capture", clean_session=False, protocol=mqtt.MQTTv311)
        client.on_message = self._on_message
        client.on_subscribe = lambda *args: self._subscribed.set()
        client.connect(host, port)
        client.loop_start()
        client.subscribe("#", qos=1)
        self._client = client
        assert self._subscribed.wait(10), "capture client was not subscribed to #"

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == SENTINEL_TOPIC:
            self._sentinel.set()
            return
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def drain(self, timeout: float = 15.0) -> list[tuple[str, bytes]]:
        """Publish a sentinel and wait for it: everything the broker routed before it has arrived."""
        self._client.publish(SENTINEL_TOPIC, b"end", qos=1).wait_for_publish(timeout)
        assert self._sentinel.wait(timeout), "the capture client never saw its own sentinel"
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# ---------------------------------------------------------------------------------------------------
# The federation, run once for the module
# ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    messages: list[tuple[str, bytes]]
    values: dict[str, set[str]]
    needles: ValueIndex
    pixels: list[PixelSource]
    pixel_index: PixelIndex
    stores: dict[str, Path]
    site_files: dict[str, list[Path]]
    checkpoint_dir: Path
    logs: dict[str, Path]


def _site_sources(root: Path) -> dict[str, dict[int, list[Path]]]:
    """Different real files per site; label 0 = CT, 1 = MR."""
    head_ct = sorted(data_path(root, "ct", "ge_head_human_28slice").glob("*.dcm"))
    prostate_mr = sorted(data_path(root, "dicom", "mr_series_prostate_adc_20slice").glob("*.dcm"))
    liver_ct = sorted(data_path(root, "dicom", "ct_series_liver_3slice").glob("*.dcm"))
    modalities = data_path(root, "dicom", "modalities")
    ts_mr = data_path(root, "dicom", "transfer_syntax_mr_9ts", "1.dcm")
    return {
        "site-1": {0: head_ct[:14] + [modalities / "CT_small.dcm"], 1: prostate_mr[:10] + [modalities / "MR_small.dcm"]},
        "site-2": {0: head_ct[14:] + liver_ct, 1: prostate_mr[10:] + [ts_mr]},
    }


def _build_sites(root: Path, work: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Lay out each site's inbox (symlinks to the real files), run both `fedge ingest`s side by side, check the stores."""
    from edge_client.ingest.store import DatasetStore

    stores, files, running = {}, {}, {}
    for site, by_label in _site_sources(root).items():
        inbox = work / f"{site}-inbox"
        files[site] = [f for label in sorted(by_label) for f in by_label[label]]
        if site == "site-1":  # one folder per class
            for label, paths in by_label.items():
                folder = inbox / f"{label}_{'ct' if label == 0 else 'mr'}"
                folder.mkdir(parents=True)
                for i, path in enumerate(paths):
                    (folder / f"{i:03d}_{path.name}").symlink_to(path.resolve())
            extra = ["--class-folders"]
        else:  # a flat inbox and a labels CSV keyed by StudyInstanceUID
            inbox.mkdir(parents=True)
            study_labels = {}
            for label, paths in by_label.items():
                for i, path in enumerate(paths):
                    (inbox / f"{label}_{i:03d}_{path.name}").symlink_to(path.resolve())
                    study_labels[str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)] = label
            labels_csv = work / f"{site}-labels.csv"
            with labels_csv.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["StudyInstanceUID", "label"])
                writer.writerows(sorted(study_labels.items()))
            extra = ["--labels", str(labels_csv)]
        stores[site] = work / f"{site}-store"
        cmd = FEDGE + [
            "ingest",
            str(inbox),
            "--store",
            str(stores[site]),
            "--size",
            "28",
            "--channels",
            "1",
            "--report",
            str(work / f"{site}-ingest.json"),
            *extra,
        ]
        log = work / f"{site}-ingest.log"
        with log.open("wb") as fh:
            running[site] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT), log)
    for site, (proc, log) in running.items():
        assert proc.wait(timeout=180) == 0, log.read_text(errors="replace")[-3000:]
        report = json.loads((work / f"{site}-ingest.json").read_text())
        assert report["quarantined"] == 0 and report["ingested"] == len(files[site]), report
        train_labels = set(DatasetStore.open(stores[site]).as_arrays()["train_labels"][:, 0].tolist())
        assert train_labels == {0, 1}, f"{site}: train split holds classes {train_labels}; the task needs CT and MR"
    return stores, files


def _pixel_sources(stores: dict[str, Path], site_files: dict[str, list[Path]]) -> list[PixelSource]:
    from edge_client.ingest.store import DatasetStore

    sources = []
    for site, path in stores.items():
        images = np.ascontiguousarray(DatasetStore.open(path).images())
        assert images.dtype == np.uint8 and len(images) > 0
        sources.append(PixelSource(f"{site} stored uint8 images", images.tobytes(), 1))
        as_trained = (images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype("<f4")  # fedge.tasks preprocess
        sources.append(PixelSource(f"{site} images as float32 training input", as_trained.tobytes(), 4))
    for site, files in site_files.items():
        for path in files:
            ds = pydicom.dcmread(path)
            sources.append(PixelSource(f"PixelData of {path.parent.name}/{path.name}", bytes(ds.PixelData), 2 if ds.BitsAllocated == 16 else 1))
    return sources


@pytest.fixture(scope="module")
def federation_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, mosquitto_broker) -> Run:  # noqa: F811
    import torch

    from fedge.checkpoint import save_checkpoint
    from fedge.models import ModelConfig, build_model

    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    work = tmp_path_factory.mktemp("phi")
    stores, site_files = _build_sites(data_dir, work)

    values = collect_values([path for files in site_files.values() for path in files])
    pixels = _pixel_sources(stores, site_files)

    config = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28)
    torch.manual_seed(0)
    init = save_checkpoint(work / "init.safetensors", build_model(config).state_dict(), config)

    capture = Capture(host, port)
    logs = {name: work / f"{name}.log" for name in ("server", *SITES)}
    commands = {
        site: FEDGE
        + [
            "agent",
            "--broker",
            broker,
            "--site",
            site,
            "--federation",
            FEDERATION,
            "--data-dir",
            str(stores[site]),
            "--state-dir",
            str(work / f"{site}-state"),
            "--quiet",
        ]
        for site in SITES
    }
    commands["server"] = FEDGE + [
        "server",
        "--broker",
        broker,
        "--federation",
        FEDERATION,
        "--init",
        str(init),
        "--clients",
        ",".join(SITES),
        "--min-clients",
        "2",
        "--rounds",
        "2",
        "--codec",
        "fp32|zstd",
        "--round-timeout",
        "120",
        "--checkpoint-dir",
        str(work / "ckpt"),
        "--quiet",
    ]
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in commands.items():
            with logs[name].open("wb") as log:
                procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        for name in ("server", *SITES):
            try:
                rc = procs[name].wait(timeout=180)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish: {logs[name].read_text(errors='replace')[-3000:]}")
            assert rc == 0, f"{name} exited {rc}: {logs[name].read_text(errors='replace')[-3000:]}"
        messages = capture.drain()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        capture.close()
    return Run(messages, values, ValueIndex(needles_for(values)), pixels, PixelIndex(pixels), stores, site_files, work / "ckpt", logs)


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------
def test_no_dicom_value_and_no_pixel_leaves_the_site(federation_run: Run) -> None:
    run = federation_run
    # The federation completed: two rounds, both sites in each, and agents were told it finished.
    state = json.loads((run.checkpoint_dir / "state.json").read_text())
    assert state["round"] == 2, state
    assert [sorted(r["clients"]) for r in state["history"]] == [list(SITES)] * 2
    assert (run.checkpoint_dir / "final.safetensors").is_file()
    control = [p for t, p in run.messages if t == Topics(FEDERATION).control and p]
    finished = [open_record(p, ControlMessage, None, federation=FEDERATION, sender="server") for p in control]
    assert finished and (finished[-1].command, finished[-1].round) == ("finished", 2)

    # The checker had something to look at: real identifiers and real pixels.
    keywords = set().union(*run.values.values())
    assert {
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "StudyDate",
        "StudyTime",
        "AcquisitionDate",
        "AcquisitionTime",
        "InstitutionName",
        "AccessionNumber",
        "StationName",
    } <= keywords, sorted(keywords)
    assert len(run.values) > 100 and len(run.pixels) == 4 + sum(len(f) for f in run.site_files.values())

    decoded = decode_traffic(run.messages)
    assert not decoded.undecodable, decoded.undecodable
    # Every update of both rounds was captured, reassembled and decoded, so the search covered them.
    updates = {k.split(" #")[0]: v for k, v in decoded.envelopes.items() if k.startswith("update")}
    assert sorted(updates) == [f"update r{r} {s}" for r in (1, 2) for s in SITES]
    assert {"global r1", "global r2", "snapshot"} <= {k.split(" #")[0] for k in decoded.envelopes}
    zstd_outputs = [name for name, _ in decoded.binaries if " zstd@" in name]
    assert any(name.startswith("payload of update") for name in zstd_outputs), "the fp32|zstd update payloads were not decompressed"

    # The agents' headers: allow-listed keys and metrics only, each from the site its topic names.
    problems = []
    for key, (raw, _) in updates.items():
        problems += header_violations(key, raw)
        assert raw["kind"] == "update" and raw["sender"] == key.split()[-1] and raw["federation"] == FEDERATION
        assert raw["codec"] == "fp32|zstd" and raw["num_samples"] > 0
    assert not problems, problems
    # Agents' status messages: only StatusMessage fields, inside the signed-record wrapper.
    for topic, payload in run.messages:
        if "/status/" in topic and payload:
            wrapper = json.loads(payload)
            assert set(wrapper) == {"sender", "body", "sig"}, payload
            assert set(json.loads(wrapper["body"])) <= set(StatusMessage.model_fields), payload
            open_record(payload, StatusMessage, None, federation=FEDERATION, sender=topic.rsplit("/", 1)[-1])

    leaks, pixel_leaks = findings(decoded, run.needles, run.pixel_index)
    assert not leaks, "DICOM values on the wire:\n" + "\n".join(leaks[:20])
    assert not pixel_leaks, "image pixels on the wire:\n" + "\n".join(pixel_leaks[:20])


def _informative_slice(source: PixelSource, length: int = WINDOW) -> bytes:
    """`length` bytes from the middle of a source, 16-aligned, whose first 32 bytes are an informative window."""
    data = source.data
    for s in range((len(data) // 2) // _BLOCK * _BLOCK, len(data) - length, _BLOCK):
        block = data[s : s + _BLOCK]
        if informative(block, source.itemsize) and informative(data[s : s + WINDOW], source.itemsize):
            return data[s : s + length]
    raise AssertionError(f"{source.label} has no informative window")


def test_the_checker_flags_planted_leaks(federation_run: Run) -> None:
    """Negative control: the same checker flags each planted leak, and leaves look-alikes alone."""
    run = federation_run
    topics = Topics(FEDERATION)
    mr = pydicom.dcmread(run.site_files["site-1"][-2])  # a prostate MR slice
    liver = pydicom.dcmread(run.site_files["site-2"][15])  # a liver CT slice
    assert str(liver.PatientName) == "JANCT000" and str(liver.PatientID) == "99000" and str(mr.PatientID).startswith("QIN-PROSTATE")
    stored, as_trained = run.pixels[0], run.pixels[1]
    liver_pixels = next(p for p in run.pixels if p.label.endswith("ct_series_liver_3slice/01.dcm"))
    noise = np.random.default_rng(7).bytes(3000)

    def envelope_with(header: dict, payload: bytes) -> bytes:
        head = json.dumps(header).encode()
        return ENVELOPE_MAGIC + len(head).to_bytes(4, "big") + head + payload

    def chunk(envelope: bytes) -> bytes:
        from fedge.protocol import split_chunks

        return split_chunks(envelope)[0].encode()

    clean_raw, _ = next(v for k, v in decode_traffic(run.messages).envelopes.items() if k.startswith("update r1 site-1"))
    assert not header_violations("clean", clean_raw)
    update = topics.update_chunk(1, "site-1", 0)
    planted = {
        "PatientID in a status JSON": (
            "value",
            topics.status("site-1"),
            json.dumps({"client": "site-1", "state": "online", "note": str(mr.PatientID)}).encode(),
        ),
        "PatientName as UTF-16 inside binary": ("value", update, noise[:501] + str(liver.PatientName).encode("utf-16-le") + noise[501:]),
        "PatientName as UTF-16-BE in a zstd frame": ("value", update, zstandard.ZstdCompressor().compress(noise + str(liver.PatientName).encode("utf-16-be"))),
        "StudyInstanceUID inside a zstd frame in an envelope": (
            "value",
            update,
            chunk(envelope_with(clean_raw, zstandard.ZstdCompressor().compress(noise + str(mr.StudyInstanceUID).encode() + noise))),
        ),
        "short numeric PatientID in a header": ("value", update, chunk(envelope_with(clean_raw | {"num_samples": int(liver.PatientID)}, b""))),
        "StudyDate in ISO form in a status": ("value", topics.status("site-2"), json.dumps({"client": "site-2", "d": "1971-07-14"}).encode()),
        "SOPInstanceUID in a topic": ("value", f"fedge/{FEDERATION}/status/{liver.SOPInstanceUID}", b"{}"),
        "32 bytes of a stored image": ("pixel", update, noise[:777] + _informative_slice(stored) + noise[777:]),
        "a stored image inside a zstd frame": (
            "pixel",
            topics.snapshot_chunk(0),
            zstandard.ZstdCompressor().compress(noise + stored.data[784 * 5 : 784 * 6] + noise),
        ),
        "32 bytes of the float32 training input": ("pixel", update, noise[:13] + _informative_slice(as_trained) + noise),
        "32 bytes of source PixelData": ("pixel", update, noise[:99] + _informative_slice(liver_pixels) + noise),
        "an extra header key": ("header", update, chunk(envelope_with(clean_raw | {"patient": "x"}, b""))),
        "an unlisted metric": ("header", update, chunk(envelope_with(clean_raw | {"metrics": {"age_years": 71.0}}, b""))),
    }
    for what, (kind, topic, payload) in planted.items():
        decoded = decode_traffic([(topic, payload)])
        leaks, pixel_leaks = findings(decoded, run.needles, run.pixel_index)
        if kind == "value":
            assert leaks and not pixel_leaks, f"checker missed {what}"
        elif kind == "pixel":
            assert pixel_leaks and not leaks, f"checker missed {what}"
        else:
            assert [p for k, (raw, _) in decoded.envelopes.items() for p in header_violations(k, raw)], f"checker missed {what}"

    # Look-alikes that are not leaks: the PatientID 99000 inside a longer number, the SeriesTime 1050 inside
    # a digest, uniform air and white runs (in uint8 and in the float32 form).
    benign = [
        (topics.status("site-2"), json.dumps({"client": "site-2", "state": "online", "metrics": {"train_seconds": 1.99000123}}).encode()),
        (topics.snapshot, json.dumps({"round": 1, "model_sha256": "ab1050cd" * 8}).encode()),
        (update, bytes(4096) + b"\xff" * 4096),
        (update, np.full(512, 1.0, "<f4").tobytes() + np.full(512, -1.0, "<f4").tobytes()),
    ]
    assert findings(decode_traffic(benign), run.needles, run.pixel_index) == ([], [])
