"""Inference backends `fedge bench` times: one small class per backend, registered by name.

Every backend runs float32 NCHW numpy in -> logits numpy out, so host<->device copies are inside
the timing for GPU backends alike. Artifacts come from `exporters.export_model` (which checks
parity with torch before anything is timed); a backend that cannot run here says why in
`unavailable()` instead of being skipped silently or imitated.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from device_profiles.schema import Profile
from fedge.models import ModelConfig
from fedge.registry import Registry

RunFn = Callable[[np.ndarray], object]


class BackendUnavailable(RuntimeError):
    """Raised by `load` when a backend turns out not to run here (e.g. a provider falls back to CPU)."""


@dataclass
class BenchContext:
    """What every backend may use: the eval-mode model on the CPU, raw data for calibration and the
    parity check, and a cache of exported artifacts (one export per format and precision)."""

    model: nn.Module
    config: ModelConfig
    profile: Profile
    calib: np.ndarray  # uint8 NHWC
    test_set: tuple[np.ndarray, np.ndarray]
    batch_sizes: tuple[int, ...]
    workdir: Path
    threads: int
    warmup: int
    iters: int
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    _artifacts: dict[str, Any] = field(default_factory=dict)

    def artifact(self, fmt: str, precision: str) -> Any:
        """The exporters' ExportResult for (fmt, precision), exporting on first use; the export
        report's checks are kept in `exports` for the bench report."""
        from exporters import ExportSpec, export_model

        key = f"{fmt}/{precision}"
        if key not in self._artifacts:
            spec = ExportSpec(
                precision=precision,  # type: ignore[arg-type]
                batch_sizes=self.batch_sizes,
                calib=self.calib if precision == "int8" else None,
                profile=self.profile.name,
                threads=self.threads,
                latency_warmup=self.warmup,
                latency_iters=self.iters,
            )
            # A copy: the parity check moves the model to the runner's device (CUDA where onnxruntime has it).
            model = copy.deepcopy(self.model)
            result = export_model(model, self.config, fmt, self.workdir / key.replace("/", "-"), spec, self.test_set)
            report = result.report
            self.exports[key] = {
                "format": fmt,
                "precision": precision,
                "passed": report["passed"],
                "checks": report["checks"],
                "max_abs_diff": report["max_abs_diff"],
                "metric": report["metric"],
                "bytes": report["bytes"],
                "notes": report["notes"],
            }
            self._artifacts[key] = result
        return self._artifacts[key]


class InferenceBackend(ABC):
    name: ClassVar[str]
    device: ClassVar[str] = "cpu"

    def label(self, ctx: BenchContext) -> str:
        return self.name

    def unavailable(self, ctx: BenchContext) -> str | None:
        """None when the backend runs here, else the reason it does not."""
        return None

    @abstractmethod
    def load(self, ctx: BenchContext) -> RunFn:
        """A function that runs one batch to completion (results on the host)."""


BACKENDS: Registry[type[InferenceBackend]] = Registry("bench backend")


def register_backend(cls: type[InferenceBackend]) -> type[InferenceBackend]:
    """Class decorator, under `cls.name`; backends run in registration order."""
    return BACKENDS.register(cls.name)(cls)


@functools.cache
def _ort() -> Any | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    return onnxruntime


def _no_cuda_reason() -> str | None:
    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"no CUDA device: torch {torch.__version__} ({build}) reports torch.cuda.is_available() False"


def _ort_session(path: Path, provider: str, threads: int) -> RunFn:
    """The exporters' session (it skips the optimizers the int8 artifact asks to skip), on `provider` only."""
    from exporters.ort import ort_runner

    fallback = [] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"]
    runner = ort_runner(path, threads, providers=[provider, *fallback])
    if (runner.device == "cuda") != (provider == "CUDAExecutionProvider"):
        raise BackendUnavailable(f"onnxruntime fell back to {runner.name}: {provider} could not start on this host")
    return runner.run


def _torch_run(model: nn.Module, device: str) -> RunFn:
    model = model.to(device).eval()

    def run(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(device)).cpu().numpy()  # .cpu() waits for the GPU

    return run


@register_backend
class TorchEager(InferenceBackend):
    name = "torch-eager-fp32"

    def load(self, ctx: BenchContext) -> RunFn:
        return _torch_run(ctx.model, "cpu")


class _OrtCpu(InferenceBackend):
    """onnxruntime on the CPU, on the `artifact` (format, precision) that the bench exported."""

    artifact: tuple[str, str]

    def unavailable(self, ctx: BenchContext) -> str | None:
        return None if _ort() else "onnxruntime is not installed (pip install 'fedge[cpu]')"

    def load(self, ctx: BenchContext) -> RunFn:
        return _ort_session(ctx.artifact(*self.artifact).path, "CPUExecutionProvider", ctx.threads)


@register_backend
class OrtFp32(_OrtCpu):
    name = "onnxruntime-fp32"
    artifact = ("onnx", "fp32")


@register_backend
class OrtInt8(_OrtCpu):
    name = "onnxruntime-int8"
    artifact = ("onnx-int8", "int8")


@register_backend
class TorchCuda(InferenceBackend):
    name = "torch-eager-fp32-cuda"
    device = "cuda"

    def unavailable(self, ctx: BenchContext) -> str | None:
        return _no_cuda_reason()

    def load(self, ctx: BenchContext) -> RunFn:
        return _torch_run(copy.deepcopy(ctx.model), "cuda")


@register_backend
class OrtCuda(InferenceBackend):
    name = "onnxruntime-fp32-cuda"
    device = "cuda"

    def unavailable(self, ctx: BenchContext) -> str | None:
        ort = _ort()
        if ort is None:
            return "onnxruntime is not installed (pip install 'fedge[gpu]' on a CUDA host)"
        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: {', '.join(providers)}); install onnxruntime-gpu on a CUDA host"
        return _no_cuda_reason()

    def load(self, ctx: BenchContext) -> RunFn:
        return _ort_session(ctx.artifact("onnx", "fp32").path, "CUDAExecutionProvider", ctx.threads)


@register_backend
class TensorRT(InferenceBackend):
    name = "tensorrt"
    device = "cuda"

    @staticmethod
    def precision(ctx: BenchContext) -> str:
        """The profile's export precision when it exports TensorRT engines, else fp16."""
        defaults = ctx.profile.defaults
        return defaults.export_precision if defaults.export_format == "tensorrt" else "fp16"

    def label(self, ctx: BenchContext) -> str:
        return f"tensorrt-{self.precision(ctx)}"

    def unavailable(self, ctx: BenchContext) -> str | None:
        from exporters.tensorrt import is_available

        if not is_available():
            return "the tensorrt Python package is not installed (pip install 'fedge[trt]' or JetPack's python3-libnvinfer on a CUDA host)"
        return _no_cuda_reason()

    def load(self, ctx: BenchContext) -> RunFn:
        from exporters.tensorrt import ENGINE, engine_runner

        result = ctx.artifact("tensorrt", self.precision(ctx))
        if result.path.name != ENGINE:
            raise BackendUnavailable(f"no TensorRT engine was built ({'; '.join(ctx.exports[f'tensorrt/{self.precision(ctx)}']['notes'])})")
        return engine_runner(result.path).run
