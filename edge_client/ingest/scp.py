"""A DICOM Storage SCP (C-STORE receiver) that feeds received images into the local store.

Bound to one address (127.0.0.1 unless the site sets another), it accepts associations only from
calling AE titles on the allow-list and only when called by its own AE title; with TLS, only from
senders whose certificate the federation CA signed. Every storage SOP class is accepted, in
uncompressed syntaxes and every compressed one an installed plugin decodes.

The C-STORE status says what happened: success only for what is in the store (or was already);
a failure for anything refused, so the sender keeps its copy and its operators see the error.
A dataset longer than the size cap is cut off while it arrives (the association is aborted).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_client.ingest.errors import QuarantineError, Reason
from edge_client.ingest.pipeline import Ingestor, Outcome, Result
from edge_client.ingest.scp_status import OUT_OF_RESOURCES, SUCCESS, status_for

log = logging.getLogger(__name__)
_PDATA = b"\x04"  # P-DATA-TF PDU type: the PDUs that carry a dataset
_COMMAND_SLACK = 64 * 1024  # the command set travels in the same PDUs as the dataset


@dataclass(frozen=True)
class ScpTls:
    """DICOM TLS (PS3.15 B.1): the CA whose certificates senders must show, and this receiver's own."""

    ca: Path
    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for what, path in (("--tls-ca", self.ca), ("--tls-cert", self.cert), ("--tls-key", self.key)):
            if path is None:
                raise ValueError("DICOM TLS needs all three of --tls-ca, --tls-cert and --tls-key")
            if not os.path.isfile(path):
                raise ValueError(f"{what} {os.fspath(path)} does not exist (the federation CA and this device's certificate and key)")

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.2 or later; a sender without a certificate from the CA is refused in the handshake."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=os.fspath(self.ca))
        context.load_cert_chain(os.fspath(self.cert), os.fspath(self.key))
        return context


@dataclass(frozen=True)
class ScpConfig:
    """Where the receiver listens and whom it accepts."""

    ae_title: str
    port: int
    allow_ae: tuple[str, ...]
    host: str = "127.0.0.1"
    tls: ScpTls | None = None

    def __post_init__(self) -> None:
        for name in (self.ae_title, *self.allow_ae):
            if not 1 <= len(name.strip()) <= 16 or "\\" in name:
                raise ValueError(f"AE title {name!r}: 1 to 16 characters, no backslash")
        if not self.allow_ae:
            raise ValueError("allow_ae is empty: name each sending modality/PACS with --allow-ae CALLING_AE")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: use 1-65535 (104 or 11112 are usual), or 0 for any free port")


def is_available() -> bool:
    """pynetdicom is an optional dependency of the agent: only the SCP needs it."""
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        return False
    return True


def _decodable_syntaxes() -> list[str]:
    from pydicom.pixels import get_decoder
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    def decodable(uid: str) -> bool:
        try:
            return bool(get_decoder(uid).is_available)
        except NotImplementedError:
            return False

    return [uid for uid in ALL_TRANSFER_SYNTAXES if decodable(uid)]


class StorageSCP:
    """Start with `start()`, stop with `stop()`; `port` is the bound port (useful with port 0)."""

    def __init__(self, ingestor: Ingestor, config: ScpConfig) -> None:
        if not is_available():
            raise RuntimeError("the DICOM receiver needs pynetdicom: pip install pynetdicom")
        self.ingestor = ingestor
        self.config = config
        self._server: Any = None
        self._cap = ingestor.config.limits.max_file_bytes
        self._received: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # association -> bytes of the message so far
        self._lock = threading.Lock()

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        context = self.config.tls.server_context() if self.config.tls else None  # bad files fail here, before binding
        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allow_ae)
        ae.require_called_aet = True
        syntaxes = _decodable_syntaxes()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)  # type: ignore[arg-type]  # always set on the storage contexts
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_DATA_RECV, self._on_data)]
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers, ssl_context=context)  # type: ignore[arg-type]

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("StorageSCP.port: call start() first")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_data(self, event: Any) -> None:
        """Every PDU as it arrives, in order (the association's reader thread): count the bytes of
        the command or dataset being sent, and cut off one past the cap before pynetdicom has
        gathered it all in memory."""
        data: bytes = event.data
        if data[:1] != _PDATA:
            return
        with self._lock:
            total = self._received.get(event.assoc, 0) + len(data)
            self._received[event.assoc] = 0 if _ends_a_fragment_stream(data) else total
        if total > self._cap + _COMMAND_SLACK and total - len(data) <= self._cap + _COMMAND_SLACK:
            error = QuarantineError(Reason.TOO_LARGE, f"a dataset over {self._cap} bytes (--max-file-mb) was arriving; association aborted")
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title, error)
            self.ingestor.refuse(error)
            event.assoc.abort(block=False)

    def _on_store(self, event: Any) -> Any:
        """Same reader, same store as a folder ingest; the status tells the sender what became of it."""
        try:
            result = self.ingestor.ingest_bytes(event.encoded_dataset(include_meta=True), f"{uuid.uuid4().hex}.dcm")
        except OSError as exc:
            log.error("C-STORE refused, the store cannot take it: %s", exc)
            return _status(OUT_OF_RESOURCES, "store I/O error on the receiver")  # the sender keeps it and may retry
        if result.outcome is not Outcome.QUARANTINED:
            return SUCCESS
        return _refusal(event, result)


def _ends_a_fragment_stream(pdu: bytes) -> bool:
    """True when a P-DATA-TF PDU holds the last fragment of a command or a dataset (PS3.8 E.2:
    items of length (4), context id (1), control header (1, bit 1 set on the last fragment), data)."""
    at, end = 6, len(pdu)
    while at + 6 <= end:
        length = int.from_bytes(pdu[at : at + 4], "big")
        if length < 2:
            return False
        if pdu[at + 5] & 0x02:
            return True
        at += 4 + length
    return False


def _refusal(event: Any, result: Result) -> Any:
    assert result.error is not None
    code = status_for(result)
    kept = "kept in quarantine" if result.kept else "not kept: quarantine full"
    log.warning("C-STORE from %s refused (0x%04X, %s): %s", event.assoc.requestor.ae_title, code, kept, result.error)
    return _status(code, f"{result.error.reason.value}" + ("" if result.kept else " (quarantine full)"))


def _status(code: int, comment: str) -> Any:
    """A status dataset: the code, and Error Comment (LO, at most 64 characters) with our reason code."""
    from pydicom.dataset import Dataset

    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status
