"""Small JSON control messages: round announcements, snapshot pointers and site status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedge.protocol.envelope import NAME_PATTERN


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes):
        return cls.model_validate_json(raw)


class TransferInfo(_Message):
    """Where a chunked envelope lives and how to check it once reassembled."""

    transfer: str = Field(pattern=r"^[0-9a-f]{32}$")
    chunks: int = Field(ge=1)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RoundAnnouncement(_Message):
    """Retained on `round/<r>/global`: everything an agent needs to take part in round r."""

    round: int = Field(ge=1)
    deadline: float
    selected: tuple[str, ...] = ()
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the global weights, to detect drift
    downlink: TransferInfo
    downlink_kind: Literal["full", "delta"]
    base_round: int | None = None
    uplink_codec: str
    train: dict[str, Any] = Field(default_factory=dict)  # epochs, lr, batch_size, mode options


class SnapshotAnnouncement(_Message):
    """Retained on `snapshot`: the latest full global model, for agents that are new or missed rounds."""

    round: int = Field(ge=0)
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    transfer: TransferInfo


class StatusMessage(_Message):
    client: str = Field(pattern=NAME_PATTERN)
    state: Literal["online", "offline", "training", "done"]
    round: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
