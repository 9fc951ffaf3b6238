"""The bounds every learning benchmark reports beside its federated runs, trained the same way:

- centralized (the upper bound): one model trained on the pooled data of all sites;
- local-only (the lower bound): each site trains a model on its own split alone; the mean over sites.

Same task, same seeded model, same Dirichlet site split and the same passes over the data as the
federation (`epochs` = rounds x local epochs), so the gap to either bound is what federating costs
or buys, not a difference in budget. One helper for every benchmark (codec_bench, modes, noniid).
"""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedge.data import dirichlet_split
from fedge.models import ModelConfig, build_model
from fedge.protocol.messages import LocalOptimizer
from fedge.schedule import LrSchedule, check_schedule, scheduled_lr
from fedge.tasks.classification import ClassificationTask
from fedge.tasks.optimizer import check_optimizer

ModelFactory = Callable[[int], nn.Module]  # seed -> the model the federation starts from (seeded init or pretrained)


@dataclass(frozen=True)
class BoundSettings:
    sites: int
    alpha: float
    epochs: int  # passes over the data: the federation's rounds x local epochs
    lr: float = 1e-3
    batch_size: int = 32
    augment: bool = False  # as the federation's TrainSettings.augment
    lr_schedule: LrSchedule = "constant"  # as the server's --lr-schedule, with one epoch per round
    logit_adjust: float = 0.0  # as TrainSettings.logit_adjust (the pooled or the site's prior)
    optimizer: LocalOptimizer = "adam"  # as TrainSettings.optimizer

    def __post_init__(self) -> None:
        if self.sites < 1 or self.epochs < 1 or not self.alpha > 0:
            raise ValueError(f"bounds: sites and epochs must be >= 1 and alpha > 0, got {self.sites}, {self.epochs}, {self.alpha}")
        check_schedule(self.lr_schedule)
        check_optimizer(self.optimizer)


# MedMNIST v2 (Yang et al. 2023), ResNet-18 at 28x28 trained centrally: the test AUC a default model's
# centralized bound should reach (shared/reference/anchors.md).
PUBLISHED_RESNET18_28_AUC = {"pneumoniamnist": 0.944, "breastmnist": 0.901}


def seeded_model(config: ModelConfig) -> ModelFactory:
    """What a server builds when it starts without a checkpoint: `config` after torch.manual_seed(seed)."""

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(config)

    return make


def _site_seed(seed: int, site: int) -> int:
    return zlib.crc32(f"{seed}/bound-site-{site}".encode())


def _train(task: ClassificationTask, model: nn.Module, indices: np.ndarray | None, settings: BoundSettings, seed: int) -> None:
    """`settings.epochs` passes at a constant lr; with a schedule, one pass per round at that round's
    lr (as a federation with one local epoch per round: the optimizer restarts each round)."""
    s = settings
    if s.lr_schedule == "constant":
        task.train_local(model, indices, epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, seed=seed, augment=s.augment, logit_adjust=s.logit_adjust,
                         optimizer=s.optimizer)  # fmt: skip
        return
    for epoch in range(1, s.epochs + 1):
        lr = scheduled_lr(s.lr, epoch, s.epochs, s.lr_schedule)
        task.train_local(model, indices, epochs=1, lr=lr, batch_size=s.batch_size, seed=zlib.crc32(f"{seed}/epoch-{epoch}".encode()), augment=s.augment,
                         logit_adjust=s.logit_adjust, optimizer=s.optimizer)  # fmt: skip


def centralized_model(task: ClassificationTask, make_model: ModelFactory, settings: BoundSettings, seed: int) -> nn.Module:
    """The model trained on all sites' data pooled (the whole train split)."""
    model = make_model(seed)
    _train(task, model, None, settings, seed)
    return model


def centralized_auc(task: ClassificationTask, make_model: ModelFactory, settings: BoundSettings, seed: int) -> float:
    """Test AUC of `centralized_model`."""
    return float(task.evaluate(centralized_model(task, make_model, settings, seed))["auc"])


def local_only_aucs(task: ClassificationTask, make_model: ModelFactory, settings: BoundSettings, seed: int) -> list[float]:
    """Test AUC of each site's model trained on its own Dirichlet split alone (the federation's split for `seed`)."""
    shards = dirichlet_split(task.splits.labels["train"], settings.sites, settings.alpha, seed)
    aucs = []
    for i, indices in enumerate(shards):
        model = make_model(seed)
        _train(task, model, np.asarray(indices), settings, _site_seed(seed, i))
        aucs.append(float(task.evaluate(model)["auc"]))
    return aucs


def learning_bounds(task: ClassificationTask, make_model: ModelFactory, settings: BoundSettings, seeds: Sequence[int]) -> dict[str, object]:
    """{"centralized_auc", "local_only_auc"} (means over `seeds`; local-only first averaged over sites),
    with the per-seed values and the settings they were trained with."""
    central = [centralized_auc(task, make_model, settings, s) for s in seeds]
    local = [local_only_aucs(task, make_model, settings, s) for s in seeds]
    return {
        "centralized_auc": statistics.fmean(central),
        "local_only_auc": statistics.fmean(statistics.fmean(a) for a in local),
        "centralized_auc_per_seed": central,
        "local_only_auc_per_seed_and_site": local,
        "seeds": list(seeds),
        "sites": settings.sites, "alpha": settings.alpha, "epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
        "augment": settings.augment, "lr_schedule": settings.lr_schedule, "logit_adjust": settings.logit_adjust, "optimizer": settings.optimizer,
    }  # fmt: skip


def bounds_report(task: ClassificationTask, make_model: ModelFactory, settings: BoundSettings, seeds: Sequence[int]) -> dict[str, object]:
    """What a benchmark report carries at its top level: "bounds" with exactly the two AUCs, and
    "bounds_detail" with the per-seed values and settings."""
    detail = learning_bounds(task, make_model, settings, seeds)
    return {"bounds": {k: detail[k] for k in ("centralized_auc", "local_only_auc")}, "bounds_detail": detail}
