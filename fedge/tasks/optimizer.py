"""The local step's optimizer, by the name a round announces (TrainSettings.optimizer).

Why two: Adam (the default) normalises each coordinate's step, so a site moves about lr per step
whatever its gradient says; under label skew a site of one class then pushes the shared model as
hard as a mixed one. SGD with momentum steps in proportion to the gradient, so a site whose
logit-adjusted loss is already small moves little, and SCAFFOLD's correction is the paper's
(Karimireddy et al. 2020 analyse SGD). Measured on BreastMNIST, 4 sites at alpha 0.5
(benchmarks/noniid.py). DP-SGD uses the same SGD (fedge.tasks.dp).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedge.protocol.messages import LOCAL_OPTIMIZERS, LocalOptimizer

SGD_MOMENTUM = 0.9


def check_optimizer(name: str) -> LocalOptimizer:
    """The name as a local optimizer, or ValueError that names the choices."""
    if name not in LOCAL_OPTIMIZERS:
        raise ValueError(f"local optimizer {name!r}: choose one of {', '.join(LOCAL_OPTIMIZERS)}")
    return name  # type: ignore[return-value]


def local_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adam", *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9."""
    if check_optimizer(name) == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
