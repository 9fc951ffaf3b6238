"""Model weights as ordered float32 numpy dicts: what deltas, codecs and aggregation work on.

Integer buffers (BatchNorm's num_batches_tracked) never travel; normalisation statistics travel
dense (fp16 on lossy codecs) because they do not sparsify well and are a tiny share of the bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

import numpy as np
import torch
from torch import nn

from compression import SparseTensor, TensorSpec

NORM_STAT_SUFFIXES = ("running_mean", "running_var")


def float_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items() if v.is_floating_point()}


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_layer_names(model: nn.Module) -> frozenset[str]:
    """The float tensors (weight, bias, running statistics) of every normalisation layer: what a
    site keeps local under FedBN. Decided by module type, not by name, so server and agent agree on
    any architecture (and inside LoRA/QAT wrappers) given the same prepared model."""
    state = model.state_dict()
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            head = f"{prefix}." if prefix else ""
            names.update(f"{head}{k}" for k, v in module.state_dict().items() if v.is_floating_point() and f"{head}{k}" in state)
    return frozenset(names)


def load_float_state(model: nn.Module, state: dict[str, np.ndarray], local: Collection[str] = ()) -> None:
    """Copy float tensors into the model; integer buffers, and the float tensors named `local`
    (a FedBN site's normalisation layers), keep their local values."""
    current = model.state_dict()
    missing = [k for k in current if current[k].is_floating_point() and k not in state and k not in local]
    if missing:
        raise ValueError(f"global model lacks {missing[:5]}: agent and server disagree on the architecture")
    with torch.no_grad():
        for k, v in state.items():
            current[k].copy_(torch.from_numpy(v))


def subtract(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: a[k] - b[k] for k in b}


def add(a: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (a[k] + delta[k]).astype(np.float32, copy=False) if k in delta else a[k] for k in a}


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """Digest of names, shapes and bytes: agents check they hold exactly the server's global."""
    digest = hashlib.sha256()
    for k, v in state.items():
        digest.update(k.encode())
        digest.update(str(v.shape).encode())
        digest.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
    return digest.hexdigest()


def norm_stat_names(state: Mapping[str, object]) -> list[str]:
    return [k for k in state if k.endswith(NORM_STAT_SUFFIXES)]


def dense_bytes(state: dict[str, np.ndarray]) -> int:
    """Size of the same tensors as a dense fp32 update: the baseline every ratio is against."""
    return int(sum(v.size for v in state.values()) * 4)


def manifest_entries(specs: list[TensorSpec]) -> tuple[dict, ...]:
    """TensorSpecs as envelope-header entries (names and shapes only: no values ever)."""
    return tuple({"name": t.name, "shape": list(t.shape)} for t in specs)


def specs_from_entries(entries) -> list[TensorSpec]:
    return [TensorSpec(e.name, tuple(e.shape)) for e in entries]


def densify(decoded: dict[str, np.ndarray | SparseTensor]) -> dict[str, np.ndarray]:
    return {k: v.to_dense() if isinstance(v, SparseTensor) else v for k, v in decoded.items()}


def manifest_sha256(specs: list[TensorSpec]) -> str:
    digest = hashlib.sha256()
    for t in specs:
        digest.update(f"{t.name}:{','.join(map(str, t.shape))};".encode())
    return digest.hexdigest()
