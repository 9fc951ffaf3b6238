"""Parity of an exported artifact with the PyTorch model it came from, on the same inputs, in one run:
max |logit difference|, the task metric on both, batch-1 latency of both, at equal thread counts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from exporters.base import ExportError, Runner
from exporters.latency import measure_latency
from fedge.models import ModelConfig
from fedge.tasks import preprocess
from fedge.tasks.metrics import classification_metrics

METRIC = "auc"
_EVAL_BATCH = 64
SYNTHETIC_SAMPLES = 256


def synthetic_images(config: ModelConfig, count: int = SYNTHETIC_SAMPLES, seed: int = 0) -> np.ndarray:
    """Seeded random uint8 NHWC images of the model's input shape: enough to compare fp32 logits
    when no labelled test set is at hand (the task metric then goes unchecked)."""
    shape = (count, config.image_size, config.image_size, config.in_channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (single-class test set) is written as null."""
    return None if math.isnan(value) else value


def check_parity(
    model: nn.Module,
    runner: Runner,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    threads: int,
    warmup: int = 10,
    iters: int = 100,
) -> dict[str, Any]:
    """The measured half of `export_report.json` (everything but format, precision and bytes).
    Without `labels` the metric is null: only the logits are compared."""
    x = preprocess(images)
    if len(x) == 0:
        raise ValueError("the parity test set is empty; pass the test split of the dataset the model was trained on")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.eval().to(runner.device)
        with torch.inference_mode():
            ref = torch.cat([model(x[i : i + _EVAL_BATCH].to(runner.device)).float().cpu() for i in range(0, len(x), _EVAL_BATCH)]).numpy()
            xn = x.numpy()
            out = np.concatenate([np.asarray(runner.run(xn[i : i + _EVAL_BATCH]), dtype=np.float32) for i in range(0, len(xn), _EVAL_BATCH)])
            if out.shape != ref.shape:
                raise ExportError(f"exported model returns shape {out.shape}, torch returns {ref.shape}")
            one = x[:1].to(runner.device)
            one_np = xn[:1]

            def torch_once() -> object:
                y = model(one)
                if runner.device != "cpu":
                    torch.cuda.synchronize()
                return y

            torch_lat = measure_latency(torch_once, warmup, iters)
            exported_lat = measure_latency(lambda: runner.run(one_np), warmup, iters)
    finally:
        torch.set_num_threads(previous)
    m_torch = classification_metrics(ref, labels)[METRIC] if labels is not None else math.nan
    m_exported = classification_metrics(out, labels)[METRIC] if labels is not None else math.nan
    return {
        "max_abs_diff": float(np.abs(out - ref).max()),
        "metric": {
            "name": METRIC,
            "torch": _finite(m_torch),
            "exported": _finite(m_exported),
            "delta": _finite(m_exported - m_torch),
        },
        "latency_ms": {
            "torch_eager": {"p50": torch_lat.p50_ms, "p95": torch_lat.p95_ms},
            "exported": {"p50": exported_lat.p50_ms, "p95": exported_lat.p95_ms},
        },
        "speedup_p50": torch_lat.p50_ms / exported_lat.p50_ms,
        "runtime": runner.name,
        "threads": threads,
        "test_samples": int(len(x)),
    }
