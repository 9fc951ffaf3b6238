"""Export for real-time inference: ONNX (fp32/fp16), int8 QDQ ONNX, TensorRT engines and Triton model
repositories, each checked against the PyTorch model (`export_report.json`) before anyone uses it.

One exporter class per format, registered by name in `EXPORTERS`; `export_artifact` is the entry
point the CLI and benchmarks use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

# Importing the modules registers their exporters.
from exporters import onnx_fp as _onnx_fp  # noqa: F401,E402
from exporters import onnx_int8 as _onnx_int8  # noqa: F401,E402
from exporters import tensorrt as _tensorrt  # noqa: F401,E402
from exporters import triton as _triton  # noqa: F401,E402
from exporters.base import (
    EXPORTERS,
    Artifact,
    Calibration,
    CalibrationError,
    Exporter,
    ExportError,
    ExportSpec,
    Runner,
    UnsupportedOpError,
    get_exporter,
    register_exporter,
)
from exporters.latency import LatencyStats, measure_latency
from exporters.onnx_int8 import load_calibration  # noqa: E402
from exporters.parity import check_parity  # noqa: E402
from fedge.checkpoint import load_checkpoint  # noqa: E402
from fedge.errors import UsageError  # noqa: E402
from fedge.files import atomic_write_bytes  # noqa: E402
from fedge.models import ModelConfig  # noqa: E402
from fedge.precision import Precision  # noqa: E402

REPORT_NAME = "export_report.json"
# What "matches the PyTorch model" means per precision: exact-ish logits for fp32, the task metric otherwise.
FP32_MAX_ABS_DIFF = 1e-4
MAX_METRIC_DROP = 0.01
NO_LABELS_NOTE = "parity checked on unlabelled images (no test split given): logits compared, the task metric not measured"


@dataclass(frozen=True)
class ExportResult:
    """The artifact's main path and the report written beside it as export_report.json."""

    path: Path
    format: str
    precision: str
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def _checks(precision: str, measured: dict[str, Any]) -> dict[str, bool]:
    if precision == "fp32":
        return {f"max_abs_diff <= {FP32_MAX_ABS_DIFF:g}": measured["max_abs_diff"] <= FP32_MAX_ABS_DIFF}
    delta = measured["metric"]["delta"]
    return {f"metric drop <= {MAX_METRIC_DROP:g}": delta is not None and delta >= -MAX_METRIC_DROP}


def export_model(
    model: nn.Module,
    config: ModelConfig,
    fmt: str,
    out_dir: str | os.PathLike,
    spec: ExportSpec,
    test_set: tuple[np.ndarray, np.ndarray | None],
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export any rebuilt network (full, LoRA-merged, pruned), verify it, and write export_report.json.

    `test_set` is (raw uint8 NHWC images, labels); labels may be None for fp32, whose check compares
    logits only (e.g. `exporters.parity.synthetic_images` when no test split is at hand)."""
    exporter = get_exporter(fmt)
    if spec.precision not in exporter.precisions:
        raise UsageError(f"format {fmt} exports {', '.join(exporter.precisions)}, not {spec.precision}; change --precision")
    if test_set[1] is None and spec.precision != "fp32":
        raise UsageError(f"the {spec.precision} parity check compares the task metric: it needs a labelled test set (--dataset)")
    step = on_step or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    step(f"exporting {fmt} ({spec.precision})")
    artifact = exporter.export(model, config, out, spec)
    step("checking structure")
    exporter.verify(artifact, spec)
    step("parity and latency against torch")
    measured = check_parity(model, exporter.runner(artifact, spec), *test_set, threads=spec.threads, warmup=spec.latency_warmup, iters=spec.latency_iters)
    checks = _checks(spec.precision, measured)
    report: dict[str, Any] = {
        "format": fmt,
        "precision": spec.precision,
        "max_abs_diff": measured.pop("max_abs_diff"),
        "metric": measured.pop("metric"),
        "latency_ms": measured.pop("latency_ms"),
        "bytes": artifact.bytes,
        **measured,
        "checks": checks,
        "passed": all(checks.values()),
        "arch": config.arch,
        "profile": spec.profile,
        "batch_sizes": list(spec.batch_sizes),
        "files": [str(p.relative_to(out)) for p in artifact.files],
        "notes": list(artifact.notes) + ([] if test_set[1] is not None else [NO_LABELS_NOTE]),
    }
    atomic_write_bytes(out / REPORT_NAME, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return ExportResult(path=artifact.path, format=fmt, precision=spec.precision, report=report)


def export_artifact(
    checkpoint_path: str | os.PathLike,
    fmt: str,
    out_dir: str | os.PathLike,
    precision: Precision | None = None,
    calib: np.ndarray | str | os.PathLike | None = None,
    profile: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    *,
    test_set: tuple[np.ndarray, np.ndarray],
    threads: int = 1,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Load a checkpoint, export it as `fmt`, and check it on `test_set` (raw uint8 NHWC images, labels).

    `precision=None` means the format's own default (onnx: fp32, onnx-int8: int8, tensorrt: fp16,
    triton: fp32); `calib` is needed for int8 only.
    """
    exporter = get_exporter(fmt)
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.build()
    spec = ExportSpec(
        precision=precision or exporter.default_precision,
        batch_sizes=batch_sizes,
        calib=None if calib is None else load_calibration(calib),
        profile=profile,
        threads=threads,
    )
    return export_model(model, checkpoint.config, fmt, out_dir, spec, test_set, on_step)


__all__ = [
    "EXPORTERS",
    "REPORT_NAME",
    "Artifact",
    "Calibration",
    "CalibrationError",
    "ExportError",
    "ExportResult",
    "ExportSpec",
    "Exporter",
    "LatencyStats",
    "Runner",
    "UnsupportedOpError",
    "export_artifact",
    "export_model",
    "get_exporter",
    "measure_latency",
    "register_exporter",
]
