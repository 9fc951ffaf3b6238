"""The exporter contract: one class per artifact format on a small ABC, registered by name.

An exporter writes its files (`export`), checks their structure (`verify`) and says how to run them
(`runner`) so the shared parity check can compare any artifact against the PyTorch model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, get_args

import numpy as np
from torch import nn

from fedge.errors import FedgeError, UsageError
from fedge.models import ModelConfig
from fedge.precision import PRECISIONS, Precision
from fedge.registry import Registry

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
MIN_OPSET = 17


class ExportError(FedgeError, RuntimeError):
    """An artifact could not be written or failed its structural check. The CLI exits with `exit_code`."""

    exit_code = 4


class UnsupportedOpError(ExportError):
    """The network uses an operator the target format (ONNX, onnxruntime, TensorRT) cannot express."""

    exit_code = 5


class CalibrationError(ExportError, UsageError):
    """int8 export without usable calibration images."""

    exit_code = 6


CalibrationMethodName = Literal["minmax", "percentile", "entropy"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethodName)


@dataclass(frozen=True)
class Calibration:
    """How int8 activation ranges come from the calibration data (onnxruntime's calibrators), all in
    the same symmetric QDQ form TensorRT consumes. MinMax keeps every outlier in range; percentile
    clips the top (100 - percentile)% of |activation|; entropy picks the clip that loses least
    information (KL). `float_ops`: op types left unquantized (TensorRT runs them in fp16/fp32), e.g.
    a denoiser's skip Adds and the BatchNorms after them, whose offset sums int8 resolves poorly.
    `reduce_range`: weights on 7 bits (onnxruntime's option); None: when the exporting CPU needs it
    (exporters.onnx_int8.saturating_int8_cpu), so that the parity check measures the model."""

    method: CalibrationMethodName = "minmax"
    percentile: float = 99.9
    float_ops: tuple[str, ...] = ()
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"calibration method {self.method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if not 90.0 <= self.percentile < 100.0:
            raise UsageError(f"calibration percentile {self.percentile}: use 90 to below 100 (e.g. 99.9)")

    def __str__(self) -> str:
        name = f"percentile {self.percentile}" if self.method == "percentile" else {"minmax": "MinMax", "entropy": "entropy"}[self.method]
        return name + (f", float {'/'.join(self.float_ops)}" if self.float_ops else "")


@dataclass(frozen=True)
class ExportSpec:
    """How to export: validated once here, so exporters never re-check strings.

    `calib` holds raw calibration images (uint8 NHWC, as the data loaders return them); they go
    through `fedge.tasks.preprocess` like every other input. `threads` is used for both torch and
    onnxruntime so the latency comparison is like for like.
    """

    precision: Precision
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    calib: np.ndarray | None = field(default=None, compare=False, repr=False)
    calib_samples: int = 512
    profile: str | None = None
    threads: int = 1
    latency_warmup: int = 10
    latency_iters: int = 100
    model_name: str | None = None
    calibration: Calibration = Calibration()  # int8: how activation ranges are calibrated

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes {self.batch_sizes} must be one or more positive integers, e.g. 1,8,32")
        object.__setattr__(self, "batch_sizes", tuple(sorted({int(b) for b in self.batch_sizes})))
        for name in ("calib_samples", "threads", "latency_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.latency_warmup < 0:
            raise ValueError(f"latency_warmup must be >= 0, got {self.latency_warmup}")

    @property
    def opt_batch(self) -> int:
        """The batch size engines are tuned for: the middle of the requested sizes."""
        return self.batch_sizes[len(self.batch_sizes) // 2]


@dataclass(frozen=True)
class Artifact:
    """What an exporter wrote. `onnx_path` is the ONNX file behind the artifact (itself, for ONNX formats)."""

    path: Path
    onnx_path: Path
    files: tuple[Path, ...]
    notes: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        """Size on disk of the deployable artifact (a file, or every file under a repository folder)."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size


@dataclass(frozen=True)
class Runner:
    """Runs an artifact: float32 NCHW in, logits out. `device` is where the torch baseline runs beside it."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    device: str = "cpu"


class Exporter(ABC):
    name: ClassVar[str]
    precisions: ClassVar[tuple[Precision, ...]]
    default_precision: ClassVar[Precision]

    @abstractmethod
    def export(self, model: nn.Module, config: ModelConfig, out_dir: Path, spec: ExportSpec) -> Artifact:
        """Write the artifact's files under `out_dir` (the model is in eval mode, on the CPU)."""

    @abstractmethod
    def verify(self, artifact: Artifact, spec: ExportSpec) -> None:
        """Raise ExportError when the files are not structurally what the format promises."""

    @abstractmethod
    def runner(self, artifact: Artifact, spec: ExportSpec) -> Runner:
        """How the parity check runs the artifact (e.g. `exporters.ort.ort_runner` on its ONNX file)."""


EXPORTERS: Registry[type[Exporter]] = Registry("export format")


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    """Class decorator, under `cls.name`; a second exporter under a taken name is a programming error."""
    if cls.default_precision not in cls.precisions:
        raise ValueError(f"exporter {cls.name!r}: default_precision {cls.default_precision} is not in {cls.precisions}")
    return EXPORTERS.register(cls.name)(cls)


def get_exporter(name: str) -> Exporter:
    return EXPORTERS.get(name)()
