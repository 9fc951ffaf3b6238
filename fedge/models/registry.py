"""Name -> builder registry and the config that travels with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

MODELS: dict[str, Callable[["ModelConfig"], nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[["ModelConfig"], nn.Module]], Callable[["ModelConfig"], nn.Module]]:
    def wrap(builder: Callable[["ModelConfig"], nn.Module]) -> Callable[["ModelConfig"], nn.Module]:
        MODELS[name] = builder
        return builder

    return wrap


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network deterministically on any site.

    `options` holds architecture-specific settings (widths, depth, patch size, pruned channel
    counts, ...) so that one schema covers every model in the zoo.
    """

    arch: str = "cnn"
    in_channels: int = 1
    num_classes: int = 2
    image_size: int = 28
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; was this checkpoint written by a newer fedge?")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def build_model(config: ModelConfig) -> nn.Module:
    """Build `config.arch`, then replay what the federation did to it: a server-pruned architecture
    (`options["pruned"]`: tensor name -> shape) and int8 fake-quantization (`options["qat"]`)."""
    try:
        builder = MODELS[config.arch]
    except KeyError:
        raise ValueError(f"unknown architecture {config.arch!r}; known: {', '.join(sorted(MODELS))}") from None
    options = {k: v for k, v in config.options.items() if k not in ("pruned", "qat")}
    model = builder(config.replace(options=options))
    if "pruned" in config.options:
        from compression.pruning import apply_shapes  # lazy: torch-pruning loads only for pruned models

        model = apply_shapes(model, config.options["pruned"])
    if "qat" in config.options:
        from compression.qat import quantize_layers

        model = quantize_layers(model, **config.options["qat"])
    return model
