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


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def default_targets(model: nn.Module, exclude: Sequence[str] = ("head",)) -> list[str]:
    """Every Linear and Conv2d layer, except those named in `exclude` (and anything inside them)."""
    return [
        name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(name == e or name.startswith(e + ".") for e in exclude)
    ]


def add_adapters(
    model: nn.Module,
    r: int,
    alpha: float,
    targets: Sequence[str] | None,
    dropout: float = 0.0,
    trainable: Sequence[str] = ("head",),
    train_norms: bool = False,
    freeze_a: bool = False,
) -> "PeftModel":
    """Freeze `model`, add rank-`r` adapters to `targets` (None: every Linear/Conv2d outside `trainable`),
    keep `trainable` layers fully trainable.

    `train_norms` also trains the affine parameters of every normalisation layer (a few thousand
    values that let a frozen backbone re-centre features for a new domain). `freeze_a` keeps the
    random down-projections A fixed and trains only B (FFA-LoRA, Sun et al. 2024): every site then
    shares A, so averaging the B's averages the adapters' products exactly, for half the traffic.
    """
    from peft import LoraConfig, get_peft_model

    missing = [t for t in trainable if t not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"layers {missing} to train fully are not in the model; name its classifier (e.g. 'head')")
    candidates = default_targets(model, exclude=trainable)
    targets = candidates if targets is None else list(targets)
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in candidates)]
    if unmatched:
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ValueError(f"LoRA targets {unmatched} match no Linear/Conv2d layer of this model; its layers: {shown} (a target is a full name or its last part)")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale works and is what r/alpha tuning uses
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=list(trainable),
        bias="none",
    )
    wrapped = get_peft_model(model, config)
    for name, module in wrapped.named_modules():
        if train_norms and isinstance(module, _NORMS):
            module.requires_grad_(True)
        if freeze_a and name.endswith("lora_A"):
            module.requires_grad_(False)
    return wrapped


def merge_adapters(model: "PeftModel") -> nn.Module:
    """A plain copy of the network with adapters folded into the weights (the training copy stays)."""
    return copy.deepcopy(model).merge_and_unload()
