"""The task contract: what the agent, the server's evaluator, the in-process simulation and the demo
call on a task, whatever it learns (classification, low-dose CT denoising).

A structural Protocol rather than a base class: a task is data + model config + local step +
metrics, and the existing classification task already has exactly this shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, Protocol, get_args

import numpy as np
from torch import nn

from fedge.errors import UsageError
from fedge.models import ModelConfig

if TYPE_CHECKING:
    from fedge.tasks.classification import TrainResult
    from fedge.tasks.dp import DPSettings

TaskName = Literal["classification", "ldct"]
TASK_NAMES: tuple[str, ...] = get_args(TaskName)
# The metric each task's round table and report lead with (`evaluate` returns it among others).
HEADLINE: dict[str, tuple[str, str]] = {"classification": ("auc", "accuracy"), "ldct": ("psnr", "ssim")}
# The architecture each task builds by default, and the only one that fits it among the zoo's.
DEFAULT_ARCH: dict[str, str] = {"classification": "cnn", "ldct": "redcnn"}


def check_task_arch(task: str, arch: str) -> None:
    """A denoiser cannot classify, nor a classifier denoise: refuse the pair before a broker starts or data loads."""
    if task not in TASK_NAMES:
        raise UsageError(f"--task {task!r}: choose one of {', '.join(TASK_NAMES)}")
    if (arch == DEFAULT_ARCH["ldct"]) != (task == "ldct"):
        raise UsageError(
            f"--arch {arch} does not fit --task {task}: use --arch {DEFAULT_ARCH[task]}"
            + ("" if task == "ldct" else " or another classifier of the zoo (resnet, vit)")
        )


class Task(Protocol):
    name: str

    def model_config(self, arch: str = ..., **options) -> ModelConfig: ...

    def train_local(
        self,
        model: nn.Module,
        indices: np.ndarray | None = None,
        *,
        epochs: int = 1,
        lr: float = 1e-3,
        batch_size: int = 32,
        seed: int = 0,
        weight_decay: float = 0.0,
        device: str = "cpu",
        dp: DPSettings | None = None,
        prox_mu: float = 0.0,
        augment: bool = False,
        logit_adjust: float = 0.0,
        correction: Mapping[str, np.ndarray] | None = None,
        optimizer: str = "adam",
    ) -> TrainResult: ...

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]: ...
