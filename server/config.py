"""Server settings: one frozen object, built by the CLI or the demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.models import ModelConfig
from fedge.protocol.chunks import DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class ServerConfig:
    federation: str
    broker: str
    model: ModelConfig
    checkpoint_dir: Path
    rounds: int = 10
    min_clients: int = 2
    expected_clients: tuple[str, ...] = ()  # if set, wait for all of them, not just min_clients
    round_timeout: float = 300.0
    uplink_codec: str = "fp32"
    downlink_codec: str | None = None  # None: full model each round; else a delta codec spec
    strategy: str = "fedavg"
    mode: str = "full"  # full | lora | pruned | qat (fedge.modes)
    mode_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=lambda: {"epochs": 1, "lr": 1e-3, "batch_size": 32})
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    client_id: str = "server"
    trusted_keys: Path | None = None  # folder of <client>.pub; when set, unsigned updates are rejected
    signing_key: Path | None = None
    wait_for_clients: float = 600.0
    dataset: str | None = None  # recorded in checkpoints so `fedge export`/`bench` find the test data
    init_checkpoint: Path | None = None  # pretrained start; else a seeded fresh model
