"""Roofline estimate of inference latency on a profile's hardware: a spec-sheet lower bound, labelled
as an estimate so it is never mixed with measured figures."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from device_profiles.schema import PEAK_FIELDS, Profile
from fedge.precision import BYTES_PER_ELEMENT, Precision


def count_flops_and_bytes(model: nn.Module, input_shape: tuple[int, ...], precision: Precision) -> tuple[int, int]:
    """FLOPs of one forward pass (FlopCounterMode: matmuls and convolutions, 2 per multiply-add), and a
    rough byte count: every parameter read once, the input read once, every leaf module's output
    written once and read once, all at `precision`."""
    activation_elements = 0

    def count_output(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal activation_elements
        if isinstance(output, torch.Tensor):
            activation_elements += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count_output) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(input_shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    input_elements = 1
    for dim in input_shape:
        input_elements *= dim
    elements = params + input_elements + 2 * activation_elements
    return int(counter.get_total_flops()), elements * BYTES_PER_ELEMENT[precision]


def estimate_latency(model: nn.Module, input_shape: tuple[int, ...], profile: Profile, precision: Precision | None = None) -> dict[str, Any]:
    """latency = max(flops / peak compute, bytes / memory bandwidth) at `precision` (default: the
    profile's export precision). Where the profile lacks a figure, the latency is None and `missing`
    names the field, rather than guessing a number."""
    precision = precision or profile.defaults.export_precision
    flops, nbytes = count_flops_and_bytes(model, input_shape, precision)
    peak = profile.device.peak_ops_per_s(precision)
    bandwidth = None if profile.device.memory_bandwidth_gbs is None else profile.device.memory_bandwidth_gbs * 1e9
    missing = []
    if peak is None:
        missing.append(f"device.{PEAK_FIELDS[precision]}")
    if bandwidth is None:
        missing.append("device.memory_bandwidth_gbs")
    compute_s = None if peak is None else flops / peak
    memory_s = None if bandwidth is None else nbytes / bandwidth
    if compute_s is None or memory_s is None:
        latency_s, bound = None, None
    else:
        latency_s = max(compute_s, memory_s)
        bound = "compute" if compute_s >= memory_s else "memory"
    return {
        "kind": "estimate",
        "method": "roofline",
        "note": "theoretical lower bound from spec-sheet peaks, not a measurement",
        "profile": profile.name,
        "precision": precision,
        "input_shape": list(input_shape),
        "flops": flops,
        "bytes": nbytes,
        "arithmetic_intensity": flops / nbytes,
        "peak_ops_per_s": peak,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "compute_ms": None if compute_s is None else compute_s * 1e3,
        "memory_ms": None if memory_s is None else memory_s * 1e3,
        "latency_ms": None if latency_s is None else latency_s * 1e3,
        "bound": bound,
        "missing": missing,
    }
