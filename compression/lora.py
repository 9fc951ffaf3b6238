"""LoRA adapters through peft on our own (non-transformers) modules.

peft matches `target_modules` against module names, so custom networks work unchanged; layers named
in `trainable` (the classifier head) are copied and trained fully through `modules_to_save`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # peft pulls in transformers (~5 s of imports): load it only when LoRA is used
    from peft import PeftModel


def default_targets(model: nn.Module, exclude: Sequence[str] = ("head",)) -> list[str]:
    """Every Linear and Conv2d layer, except those named in `exclude` (and anything inside them)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(name == e or name.startswith(e + ".") for e in exclude)
    ]


def add_adapters(
    model: nn.Module,
    r: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float = 0.0,
    trainable: Sequence[str] = ("head",),
) -> "PeftModel":
    """Freeze `model`, add rank-`r` adapters to `targets`, keep `trainable` layers fully trainable."""
    from peft import LoraConfig, get_peft_model

    missing = [t for t in trainable if t not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"layers {missing} to train fully are not in the model; name its classifier (e.g. 'head')")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        modules_to_save=list(trainable),
        bias="none",
    )
    return get_peft_model(model, config)


def merge_adapters(model: "PeftModel") -> nn.Module:
    """A plain copy of the network with adapters folded into the weights (the training copy stays)."""
    return copy.deepcopy(model).merge_and_unload()
