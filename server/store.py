"""Per-round checkpoints, written atomically, and resume after a crash.

Layout: `round_NNNN.safetensors` (a fedge checkpoint: weights + model config + mode) and `state.json`
(schema version, last completed round, history, downlink residual file). state.json is replaced only after the
weights are on disk, so a kill -9 at any moment leaves the previous round intact.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.checkpoint import load_checkpoint, save_checkpoint
from fedge.errors import UsageError, check_schema_version
from fedge.files import atomic_write_bytes
from fedge.models import ModelConfig
from fedge.modes import TrainingMode

# Of state.json and run.json; a newer one is refused, not misread.
SCHEMA_VERSION = 1


@dataclass
class RoundState:
    round: int
    weights: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)


class CheckpointStore:
    """Round checkpoints hold the training-time model (e.g. with LoRA adapters) for resume;
    `final.safetensors` holds the plain exported model. Both record the mode and its options, so
    `fedge export` and `fedge bench` take either (fedge.checkpoint.Checkpoint.build)."""

    def __init__(self, folder: Path, config: ModelConfig, template: nn.Module, mode: TrainingMode, dataset: str | None,
                 local: Collection[str] = ()):  # fmt: skip
        """`local`: tensors that stay at the sites (FedBN's normalisation layers): neither saved nor expected."""
        self.folder = Path(folder)
        self.config = config
        self.mode = mode
        self.meta: dict[str, Any] = {"dataset": dataset} if dataset else {}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._order = [k for k, v in template.state_dict().items() if v.is_floating_point() and k not in local]  # names only, no copy
        self._buffers = {k: v for k, v in template.state_dict().items() if not v.is_floating_point()}

    @property
    def run_file(self) -> Path:
        return self.folder / "run.json"

    def run_id(self) -> str:
        """This federation run's id: random at the first start, the same after every restart (so
        agents keep their cached updates), new when the folder is new (so nothing of an earlier
        run can be replayed into this one)."""
        if self.run_file.exists():
            record = json.loads(self.run_file.read_text())
            check_schema_version(record.get("schema_version"), SCHEMA_VERSION, str(self.run_file))
            return str(record["run"])
        run = secrets.token_hex(16)
        atomic_write_bytes(self.run_file, json.dumps({"schema_version": SCHEMA_VERSION, "run": run, "started": time.time()}).encode())
        return run

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def model_path(self, rnd: int) -> Path:
        return self.folder / f"round_{rnd:04d}.safetensors"

    @property
    def final_path(self) -> Path:
        return self.folder / "final.safetensors"

    def save(self, state: RoundState, federation: str, extra: dict[str, Any] | None = None) -> Path:
        tensors = {k: torch.from_numpy(state.weights[k]) for k in self._order} | self._buffers  # the model only (not SCAFFOLD's variates)
        path = save_checkpoint(
            self.model_path(state.round), tensors, self.config, mode=self.mode, prepared=True,
            round=state.round, federation=federation, **self.meta,
        )  # fmt: skip
        record = {"schema_version": SCHEMA_VERSION, "round": state.round, "model": path.name, "federation": federation,
                  "history": state.history, **(extra or {})}  # fmt: skip
        atomic_write_bytes(self.state_file, json.dumps(record, indent=1).encode())
        return path

    def save_final(self, model: nn.Module, config: ModelConfig, rnd: int, federation: str) -> Path:
        """`model` is the mode's exported model and `config` what `build_model` rebuilds it from (mode.final_config)."""
        return save_checkpoint(self.final_path, model.state_dict(), config, mode=self.mode, round=rnd, federation=federation, **self.meta)

    def load_latest(self) -> tuple[RoundState, dict[str, Any]] | None:
        if not self.state_file.exists():
            return None
        record = json.loads(self.state_file.read_text())
        # state.json from before the version field is version 1.
        check_schema_version(record.pop("schema_version", SCHEMA_VERSION), SCHEMA_VERSION, str(self.state_file))
        ckpt = load_checkpoint(self.folder / record["model"])
        if ckpt.config != self.config or ckpt.mode != self.mode:
            raise UsageError(
                f"checkpoint in {self.folder} was written for model {ckpt.config} in mode {ckpt.mode}, "
                f"not {self.config} in mode {self.mode}; use another --checkpoint-dir or the same model settings"
            )
        missing = [k for k in self._order if k not in ckpt.state]
        if missing:
            raise ValueError(f"checkpoint {record['model']} lacks {missing[:3]}; it does not belong to this federation's model")
        weights = {k: ckpt.state[k].numpy().astype(np.float32) for k in self._order}  # model order, not the file's
        return RoundState(record["round"], weights, record.get("history", [])), record
