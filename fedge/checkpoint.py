"""Checkpoints: one safetensors file holding the weights plus the model config and run metadata.

Every command (server, demo, export, bench, compress) reads this one format, so a checkpoint is
self-describing: the config needed to rebuild the network travels in the safetensors metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from fedge.files import atomic_write_bytes
from fedge.models import ModelConfig, build_model

_META_KEY = "fedge"


@dataclass(frozen=True)
class Checkpoint:
    config: ModelConfig
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        """Rebuild the network and load the weights, with an error that names the mismatch."""
        model = build_model(self.config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state))
        unexpected = sorted(set(self.state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(self.state) if expected[k].shape != self.state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"checkpoint does not match model config {self.config.arch!r}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}. "
                "Pass the checkpoint written for this model, or rebuild it with the same --arch/options."
            )
        model.load_state_dict(self.state)
        return model.eval()


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], config: ModelConfig, **meta: Any) -> Path:
    """Atomic: a crash mid-write leaves the previous checkpoint under `path`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {_META_KEY: json.dumps({"config": json.loads(config.to_json()), **meta})}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; `fedge demo --report r.json` writes one and names it in the report")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
        state = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    if raw is None:
        raise ValueError(f"{path} has no fedge metadata; it was not written by fedge (save it with fedge.checkpoint.save_checkpoint)")
    meta = json.loads(raw)
    config = ModelConfig.from_json(json.dumps(meta.pop("config")))
    return Checkpoint(config=config, state=state, meta=meta)
