"""Name -> builder registry and the config that travels with every checkpoint and global model."""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fedge.errors import UsageError, check_schema_version
from fedge.registry import Registry

MODELS: Registry[Callable[["ModelConfig"], nn.Module]] = Registry("architecture")
# Written into every config's JSON; a config from a newer fedge is refused, one without the field predates it.
SCHEMA_VERSION = 1


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

    def __post_init__(self) -> None:
        # It arrives from the wire (a global's header) and from files: check types and ranges here, once.
        if not isinstance(self.arch, str) or not self.arch:
            raise UsageError(f"model config field 'arch' must be a non-empty string, got {self.arch!r}")
        for name in ("in_channels", "num_classes", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= int(value) <= 1 << 16:
                raise UsageError(f"model config field {name!r} must be an integer in [1, 65536], got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers too, so the JSON form is plain
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise UsageError(f"model config field 'options' must be a mapping of names to values, got {type(self.options).__name__}")

    def to_json(self) -> str:
        return json.dumps({"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        check_schema_version(data.pop("schema_version", SCHEMA_VERSION), SCHEMA_VERSION, "model config")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UsageError(f"unknown model config fields {sorted(unknown)}; was this checkpoint written by a newer fedge?")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def build_model(config: ModelConfig) -> nn.Module:
    """Build `config.arch`, then replay what the federation did to it: a server-pruned architecture
    (`options["pruned"]`: tensor name -> shape) and int8 fake-quantization (`options["qat"]`)."""
    builder = MODELS.get(config.arch)
    options = {k: v for k, v in config.options.items() if k not in ("pruned", "qat")}
    model = builder(config.replace(options=options))
    if "pruned" in config.options:
        # Lazy: `import fedge.models` alone stays free of torch-pruning (anything that imports fedge.modes loads it anyway).
        from compression.pruning import apply_shapes

        model = apply_shapes(model, config.options["pruned"])
    if "qat" in config.options:
        from compression.qat import quantize_layers

        model = quantize_layers(model, **config.options["qat"])
    return model
