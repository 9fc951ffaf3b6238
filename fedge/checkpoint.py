"""Checkpoints: one safetensors file holding the weights plus the model config and run metadata.

Every command (server, demo, export, bench, compress) reads this one format, and a checkpoint is
self-describing in every training mode: the metadata says which mode trained the tensors and
whether they are in that mode's training form (a round checkpoint: LoRA adapters beside the
backbone, fake-quant observers, ...) or plain (final, pretrained). `Checkpoint.build()` turns
either into the plain model `fedge export` and `fedge bench` take.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from fedge.errors import NotFoundError, UsageError, check_schema_version
from fedge.files import atomic_write_bytes
from fedge.models import ModelConfig, build_model
from fedge.modes import FullMode, TrainingMode, get_mode

_META_KEY = "fedge"
SCHEMA_VERSION = 1
# Metadata keys the format owns; everything else is the writer's (round, federation, dataset, metrics).
_OWN_KEYS = ("schema_version", "config", "mode", "mode_options", "prepared")


@dataclass(frozen=True)
class Checkpoint:
    """Weights and what they are. `prepared`: the tensors fit `mode.prepare(build_model(config))`
    (the server's round checkpoints, kept in training form for resume); else `build_model(config)`."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    mode: TrainingMode = field(default_factory=FullMode)
    prepared: bool = False

    def build(self) -> torch.nn.Module:
        """The plain model in eval mode (LoRA merged, fake-quant kept), with an error that names the mismatch."""
        model = build_model(self.config)
        if self.prepared:
            model = self.mode.prepare(model, self.config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state))
        unexpected = sorted(set(self.state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(self.state) if expected[k].shape != self.state[k].shape)
        if missing or unexpected or wrong:
            form = f" ({self.mode.name} training form)" if self.prepared else ""
            raise UsageError(
                f"checkpoint does not match model config {self.config.arch!r}{form}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}. "
                "Pass the checkpoint written for this model, or rebuild it with the same --arch/options."
            )
        model.load_state_dict(self.state)
        return (self.mode.export_model(model) if self.prepared else model).eval()


def save_checkpoint(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    *,
    mode: TrainingMode | None = None,
    prepared: bool = False,
    **meta: Any,
) -> Path:
    """Atomic: a crash mid-write leaves the previous checkpoint under `path`. `mode` and `prepared`
    as in `Checkpoint`; `meta` holds the writer's facts (JSON values)."""
    clash = sorted(set(meta) & set(_OWN_KEYS))
    if clash:
        raise ValueError(f"checkpoint metadata keys {clash} belong to the format; name them otherwise")
    mode = mode or FullMode()
    header = {
        "schema_version": SCHEMA_VERSION,
        "config": json.loads(config.to_json()),
        "mode": mode.name,
        "mode_options": dataclasses.asdict(mode),
        "prepared": prepared,
        **meta,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={_META_KEY: json.dumps(header)}))
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no checkpoint at {path}; `fedge demo --report r.json` writes one and names it in the report")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
        state = load_file(str(path))
    except SafetensorError as exc:
        raise UsageError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    if raw is None:
        raise UsageError(f"{path} has no fedge metadata; it was not written by fedge (save it with fedge.checkpoint.save_checkpoint)")
    meta = json.loads(raw)
    # Files from before the version field are version 1 in the full mode's plain form.
    check_schema_version(meta.pop("schema_version", SCHEMA_VERSION), SCHEMA_VERSION, f"checkpoint {path}")
    config = ModelConfig.from_json(json.dumps(meta.pop("config")))
    mode = get_mode(meta.pop("mode", "full"), **meta.pop("mode_options", {}))
    prepared = bool(meta.pop("prepared", False))
    return Checkpoint(config=config, state=state, meta=meta, mode=mode, prepared=prepared)


def init_from_checkpoint(path: str, *, in_channels: int, num_classes: int, image_size: int, dataset: str | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """A pretrained backbone for a new task. The head is re-initialised when the class count differs
    or when the checkpoint was trained on another dataset (its label 1 may mean the opposite, e.g.
    pneumonia vs benign); the backbone is kept. Seed torch before calling so every site agrees.
    """
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    if (cfg.in_channels, cfg.image_size) != (in_channels, image_size):
        raise UsageError(
            f"checkpoint {path} was pretrained on {cfg.in_channels}-channel {cfg.image_size}px images, the dataset has "
            f"{in_channels}-channel {image_size}px; pretrain on data of the same shape (fedge pretrain --dataset ...)"
        )
    pretrained_on = ckpt.meta.get("dataset")
    if cfg.num_classes == num_classes and (dataset is None or pretrained_on in (None, dataset)):
        return ckpt.build(), cfg
    config = cfg.replace(num_classes=num_classes)
    model = build_model(config)
    own = model.state_dict()
    plain = ckpt.build().state_dict()  # a round checkpoint's training form, made plain first
    fresh = sorted(k for k in own if k.startswith("head.") or k not in plain or own[k].shape != plain[k].shape)
    if any(not k.startswith("head.") for k in fresh):
        raise UsageError(f"checkpoint {path} differs from its own config beyond the head: {fresh[:5]}")
    model.load_state_dict({k: v for k, v in plain.items() if k not in fresh}, strict=False)
    return model, config
