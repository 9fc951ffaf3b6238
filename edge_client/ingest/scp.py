"""A DICOM Storage SCP (C-STORE receiver) that feeds received images into the local store.

Bound to one address (127.0.0.1 unless the site sets another), it accepts associations only from
calling AE titles on the allow-list and only when called by its own AE title. Every storage SOP
class is accepted, in uncompressed syntaxes and every compressed one an installed plugin decodes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from edge_client.ingest.pipeline import Ingestor

# C-STORE status codes (PS3.4 Annex B.2.3)
_SUCCESS = 0x0000
_OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class ScpConfig:
    """Where the receiver listens and whom it accepts."""

    ae_title: str
    port: int
    allow_ae: tuple[str, ...]
    host: str = "127.0.0.1"

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

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allow_ae)
        ae.require_called_aet = True
        syntaxes = _decodable_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("StorageSCP.port: call start() first")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        """Same reader, same store as a folder ingest; a bad dataset is quarantined and acknowledged."""
        try:
            self.ingestor.ingest_bytes(event.encoded_dataset(include_meta=True), f"{uuid.uuid4().hex}.dcm")
        except OSError:
            return _OUT_OF_RESOURCES  # the store cannot take it: the sender keeps it and may retry
        return _SUCCESS
