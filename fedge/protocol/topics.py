"""Topic names under `fedge/<federation>/` and a strict parser for the ones the server receives."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedge.protocol.envelope import NAME_PATTERN

NAME_RE = re.compile(NAME_PATTERN)


def check_name(kind: str, value: str) -> str:
    """Federation and client names become topic levels: no wildcards, slashes or control bytes."""
    if not NAME_RE.match(value):
        raise ValueError(f"{kind} {value!r} is invalid: use 1-64 letters, digits, '_', '-' or '.'")
    return value


@dataclass(frozen=True)
class TopicInfo:
    kind: str  # "update" | "global" | "announce" | "status" | "snapshot" | "snapshot_chunk" | "control"
    round: int | None = None
    client: str | None = None
    chunk: int | None = None


@dataclass(frozen=True)
class Topics:
    federation: str

    def __post_init__(self) -> None:
        check_name("federation", self.federation)

    @property
    def root(self) -> str:
        return f"fedge/{self.federation}"

    def announce(self, rnd: int) -> str:
        return f"{self.root}/round/{rnd}/global"

    def global_chunk(self, rnd: int, index: int) -> str:
        return f"{self.root}/round/{rnd}/global/{index}"

    def update_chunk(self, rnd: int, client: str, index: int) -> str:
        return f"{self.root}/round/{rnd}/update/{client}/{index}"

    def status(self, client: str) -> str:
        return f"{self.root}/status/{client}"

    @property
    def control(self) -> str:
        return f"{self.root}/control"

    @property
    def snapshot(self) -> str:
        return f"{self.root}/snapshot"

    def snapshot_chunk(self, index: int) -> str:
        return f"{self.root}/snapshot/{index}"

    # Subscription filters
    @property
    def all_updates(self) -> str:
        return f"{self.root}/round/+/update/+/+"

    @property
    def all_status(self) -> str:
        return f"{self.root}/status/+"

    @property
    def all_announcements(self) -> str:
        return f"{self.root}/round/+/global"

    @property
    def all_global_chunks(self) -> str:
        return f"{self.root}/round/+/global/+"

    @property
    def all_snapshot_chunks(self) -> str:
        return f"{self.root}/snapshot/+"

    def parse(self, topic: str) -> TopicInfo:
        """Raise ValueError for anything that is not one of our topics, so garbage is logged, not used."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise ValueError(f"topic {topic!r} is outside federation {self.federation!r}")
        parts = topic[len(prefix) :].split("/")
        try:
            if parts[0] == "round" and len(parts) == 3 and parts[2] == "global":
                return TopicInfo("announce", round=_nonneg(parts[1]))
            if parts[0] == "round" and len(parts) == 4 and parts[2] == "global":
                return TopicInfo("global", round=_nonneg(parts[1]), chunk=_nonneg(parts[3]))
            if parts[0] == "round" and len(parts) == 5 and parts[2] == "update":
                return TopicInfo("update", round=_nonneg(parts[1]), client=check_name("client", parts[3]), chunk=_nonneg(parts[4]))
            if parts[0] == "status" and len(parts) == 2:
                return TopicInfo("status", client=check_name("client", parts[1]))
            if parts == ["snapshot"]:
                return TopicInfo("snapshot")
            if parts[0] == "snapshot" and len(parts) == 2:
                return TopicInfo("snapshot_chunk", chunk=_nonneg(parts[1]))
            if parts == ["control"]:
                return TopicInfo("control")
        except ValueError as exc:
            raise ValueError(f"malformed topic {topic!r}: {exc}") from None
        raise ValueError(f"unknown topic {topic!r}")


def _nonneg(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise ValueError(f"{text!r} is not a non-negative integer")
    return int(text)
