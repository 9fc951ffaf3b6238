"""Structured (channel) pruning with torch-pruning, and the shape record that lets another machine
rebuild exactly the pruned architecture.

The server prunes once (`prune_channels`); what travels is a JSON-able map of every tensor whose
shape changed (`changed_shapes`), and each agent applies it to a freshly built unpruned model
(`apply_shapes`). Both sides then hold modules with identical parameter names and shapes, so
deltas cover only the remaining channels.

Attention modules that expose an `nn.Linear` named `qkv` and an int `num_heads` are pruned per head
dimension (every head keeps the same width, the head count is unchanged), so code that derives the
head width from `qkv`'s weight keeps working.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn


@dataclass(frozen=True)
class PruneStats:
    """Size of the model before and after pruning, for reports."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def mac_reduction(self) -> float:
        return self.macs_before / max(self.macs_after, 1)


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    return {
        m.qkv: int(m.num_heads)  # type: ignore[misc,arg-type]  # ViT attention blocks, found by duck typing
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    }


def prune_channels(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    ignored_layers: Iterable[nn.Module] = (),
    round_to: int | None = None,
) -> PruneStats:
    """Remove `ratio` of the channels of every prunable group in place, lowest L2 magnitude first.

    `ignored_layers` keep their output channels (pass the classifier head so the class count stays).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}; 0.5 removes half the channels")
    was_training = model.training
    model.eval()
    macs_before, params_before = tp.utils.count_ops_and_params(model, example_input)
    heads = _attention_heads(model)
    with warnings.catch_warnings():
        # Free parameters (a ViT's cls_token/pos_embed) are pruned along their last non-singleton
        # dimension, the embedding width: the behaviour we want, announced by a warning.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=list(ignored_layers),
            round_to=round_to,
            num_heads=heads,
            prune_num_heads=False,
            prune_head_dims=bool(heads),
        )
        pruner.step()
    macs_after, params_after = tp.utils.count_ops_and_params(model, example_input)
    model.train(was_training)
    return PruneStats(int(params_before), int(params_after), int(macs_before), int(macs_after))


def changed_shapes(pruned: nn.Module, reference: nn.Module) -> dict[str, list[int]]:
    """Every parameter/buffer of `pruned` whose shape differs from `reference` (the unpruned build)."""
    ref = reference.state_dict()
    mine = pruned.state_dict()
    if set(ref) != set(mine):
        diff = sorted(set(ref) ^ set(mine))
        raise ValueError(f"pruned and reference models hold different tensors {diff[:5]}; build the reference from the same config")
    return {name: list(t.shape) for name, t in mine.items() if t.shape != ref[name].shape}


def _sync_layer_attributes(module: nn.Module) -> None:
    """Keep the bookkeeping attributes torch-pruning would have updated in step with the weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.weight.shape[0] if module.weight is not None else module.running_mean.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def apply_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Shrink the named tensors of an unpruned `model` to `shapes`, in place.

    New tensors keep the leading slice of the original initialisation (deterministic); their
    values are meant to be overwritten by the server's weights.
    """
    owners: set[nn.Module] = set()
    for name, shape in shapes.items():
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"pruned shape for {name!r} names no module of this model; was it pruned from another architecture?") from None
        old = getattr(module, attr, None)
        if not isinstance(old, torch.Tensor):
            raise ValueError(f"pruned shape for {name!r} names no tensor of this model")
        if len(shape) != old.dim() or any(s > o or s < 1 for s, o in zip(shape, old.shape)):
            raise ValueError(f"pruned shape {shape} for {name!r} does not fit inside the unpruned shape {list(old.shape)}")
        data = old.detach()[tuple(slice(0, s) for s in shape)].clone()
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(data, requires_grad=old.requires_grad))
        else:
            module.register_buffer(attr, data, persistent=attr not in module._non_persistent_buffers_set)
        owners.add(module)
    for module in owners:
        _sync_layer_attributes(module)
    return model
