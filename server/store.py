"""Per-round checkpoints, written atomically, and resume after a crash.

Layout: `round_NNNN.safetensors` (a fedge checkpoint: weights + model config) and `state.json`
(last completed round, history, downlink residual file). state.json is replaced only after the
weights are on disk, so a kill -9 at any moment leaves the previous round intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge import weights as W
from fedge.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from fedge.models import ModelConfig, build_model


@dataclass
class RoundState:
    round: int
    weights: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)


class CheckpointStore:
    def __init__(self, folder: Path, config: ModelConfig):
        self.folder = Path(folder)
        self.config = config
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffers = {k: v for k, v in build_model(config).state_dict().items() if not v.is_floating_point()}

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def model_path(self, rnd: int) -> Path:
        return self.folder / f"round_{rnd:04d}.safetensors"

    @property
    def final_path(self) -> Path:
        return self.folder / "final.safetensors"

    def save(self, state: RoundState, federation: str, extra: dict[str, Any] | None = None) -> Path:
        tensors = {k: torch.from_numpy(v) for k, v in state.weights.items()} | self._buffers
        path = save_checkpoint(self.model_path(state.round), tensors, self.config, round=state.round, federation=federation)
        record = {"round": state.round, "model": path.name, "federation": federation, "history": state.history, **(extra or {})}
        atomic_write_bytes(self.state_file, json.dumps(record, indent=1).encode())
        return path

    def save_final(self, state: RoundState, federation: str) -> Path:
        tensors = {k: torch.from_numpy(v) for k, v in state.weights.items()} | self._buffers
        return save_checkpoint(self.final_path, tensors, self.config, round=state.round, federation=federation)

    def load_latest(self) -> tuple[RoundState, dict[str, Any]] | None:
        if not self.state_file.exists():
            return None
        record = json.loads(self.state_file.read_text())
        ckpt = load_checkpoint(self.folder / record["model"])
        if ckpt.config != self.config:
            raise ValueError(
                f"checkpoint in {self.folder} was written for model {ckpt.config}, not {self.config}; "
                "use another --checkpoint-dir or the same model settings"
            )
        weights = W.float_state(ckpt.build())  # model order, not the file's alphabetical order
        return RoundState(record["round"], weights, record.get("history", [])), record
