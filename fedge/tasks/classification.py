"""Image classification on MedMNIST-layout arrays: the local training step every site runs."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedge.controlvariates import VariateStep
from fedge.data import ImageSplits
from fedge.models import ModelConfig
from fedge.tasks.augment import augment_batch
from fedge.tasks.metrics import classification_metrics
from fedge.tasks.optimizer import local_optimizer

if TYPE_CHECKING:
    from fedge.tasks.dp import DPSettings


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]: the one input normalisation (training, export, bench)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def default_device() -> str:
    """CUDA when the device has it (workstation GPU, Jetson), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalTrainer:
    """The local step every site runs: Adam (or SGD, as announced) on the trainable parameters, cross-entropy, on one device.

    On CUDA it trains in bfloat16 autocast where the GPU supports it (Ampere and newer, Jetson Orin
    included), which needs no loss scaling; elsewhere in fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        device: str = "cpu",
        prox_mu: float = 0.0,
        augment: torch.Generator | None = None,
        logit_bias: torch.Tensor | None = None,
        variates: VariateStep | None = None,
    ):
        self.device = device
        self.model = model.to(device).train()  # for the trainer's lifetime, not once per step
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = local_optimizer(params, optimizer, lr=lr, weight_decay=weight_decay)
        self.loss_fn = nn.CrossEntropyLoss()
        self.autocast = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        # FedProx (Li et al., 2020): mu/2 * ||w - w_global||^2 over the trained parameters, anchored
        # at the weights the round started from, keeps a skewed site near the global.
        self.prox_mu = prox_mu
        self.anchor = [(p, p.detach().clone()) for p in params] if prox_mu > 0 else []
        self.augment = augment  # flips and shifts drawn from this generator (fedge.tasks.augment); None: the images as they are
        # Logit adjustment (Menon et al., 2021): tau * log(class prior) added to the logits in the loss
        # only, so a site whose labels are nearly all one class does not learn that prior into the
        # shared weights; the model it sends predicts with plain logits.
        self.logit_bias = None if logit_bias is None else logit_bias.to(device)
        self.variates = variates  # SCAFFOLD: c - c_i added to every gradient (fedge.controlvariates)

    def proximal(self) -> torch.Tensor | float:
        """mu/2 * ||w - w_global||^2 (0 without FedProx)."""
        if not self.anchor:
            return 0.0
        return 0.5 * self.prox_mu * sum(((p - p0) ** 2).sum() for p, p0 in self.anchor)

    def batch(self, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return preprocess(images).to(self.device), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One optimizer step; returns (loss, correct predictions)."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(x)
            loss = self.loss_fn(logits.float() if self.logit_bias is None else logits.float() + self.logit_bias, y)
        (loss + self.proximal()).backward()
        if self.variates is not None:
            self.variates.apply()
        self.optimizer.step()
        return float(loss.detach()), int((logits.argmax(1) == y).sum())

    def epoch(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None = None) -> tuple[float, int, int, int]:
        """One pass over (x, y) in `order` (default: as given): summed loss, correct, samples seen,
        steps. A batch of one sample is skipped: BatchNorm cannot train on it."""
        order = torch.arange(len(y)) if order is None else order
        total, correct, seen, steps = 0.0, 0, 0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size].to(self.device)
            if len(idx) < 2:
                continue
            batch = x[idx] if self.augment is None else augment_batch(x[idx], self.augment)
            loss, hits = self.step(batch, y[idx])
            total, correct, seen, steps = total + loss * len(idx), correct + hits, seen + len(idx), steps + 1
        return total, correct, seen, steps


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    loss: float
    accuracy: float
    seconds: float
    dp_sample_rate: float = 0.0  # DP-SGD only: Poisson sampling rate and noisy steps, for the privacy ledger
    dp_steps: int = 0
    mean_gradient: dict[str, np.ndarray] | None = None  # with a SCAFFOLD correction: the site's next control variate


def logit_bias(labels: np.ndarray, num_classes: int, tau: float) -> torch.Tensor:
    """tau * log(prior) of the labels a site trains on, add-one smoothed so a class it never saw
    gets a finite (very negative) bias rather than -inf."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=num_classes).astype(np.float64)
    return torch.tensor(tau * np.log((counts + 1.0) / (counts.sum() + num_classes)), dtype=torch.float32)


class ClassificationTask:
    """Holds one site's (or the evaluator's) arrays and knows how to train and score a model on them."""

    name = "classification"

    def __init__(self, splits: ImageSplits):
        self.splits = splits

    def model_config(self, arch: str = "cnn", **options) -> ModelConfig:
        return ModelConfig(
            arch=arch,
            in_channels=self.splits.channels,
            num_classes=self.splits.num_classes,
            image_size=self.splits.image_size,
            options=options,
        )

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
    ) -> TrainResult:
        """Train in place on the train split (or its `indices`); deterministic for a given seed on CPU.
        With `dp`, DP-SGD (`fedge.tasks.dp.train_dp`: Poisson batches, per-sample clipping, noise);
        with `prox_mu` > 0, FedProx's proximal term (the loss reported is the data loss alone);
        with `augment`, random flips and shifts of each batch (`fedge.tasks.augment`); with
        `logit_adjust` tau > 0, the loss sees logits + tau log(prior of these labels); with
        `correction` (SCAFFOLD's c - c_i by parameter name), every gradient is corrected and the
        result carries the mean raw gradient; `optimizer` adam or sgd (fedge.tasks.optimizer; DP-SGD is SGD)."""
        images = self.splits.images["train"]
        labels = self.splits.labels["train"]
        if indices is not None:
            images, labels = images[indices], labels[indices]
        if dp is not None:
            if prox_mu > 0:
                raise ValueError("FedProx's proximal term is not implemented with DP-SGD: announce prox_mu=0 with dp_noise_multiplier")
            if augment or logit_adjust > 0 or correction is not None:
                raise ValueError(
                    "augmentation, logit adjustment and control variates are not implemented with DP-SGD (opacus's own loop): announce none of them with dp_noise_multiplier"
                )
            from fedge.tasks.dp import train_dp

            y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
            return train_dp(model, preprocess(images), y, dp, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
        generator = torch.Generator().manual_seed(seed)
        bias = logit_bias(labels, self.splits.num_classes, logit_adjust) if logit_adjust > 0 else None
        variates = VariateStep(model, correction) if correction is not None else None
        trainer = LocalTrainer(model, lr=lr, weight_decay=weight_decay, optimizer=optimizer, device=device, prox_mu=prox_mu, augment=generator if augment else None,
                               logit_bias=bias, variates=variates)  # fmt: skip
        x_all, y_all = trainer.batch(images, labels)
        start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
        for _ in range(epochs):
            loss, hits, n, _steps = trainer.epoch(x_all, y_all, batch_size, torch.randperm(len(y_all), generator=generator))
            total_loss, correct, seen = total_loss + loss, correct + hits, seen + n
        model.to("cpu").eval()
        return TrainResult(
            num_samples=len(y_all),
            loss=total_loss / max(seen, 1),
            accuracy=correct / max(seen, 1),
            seconds=time.perf_counter() - start,
            mean_gradient=variates.mean_gradient() if variates is not None else None,
        )

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str = "test", batch_size: int = 256) -> np.ndarray:
        model.eval()
        x_all = preprocess(self.splits.images[split])
        return torch.cat([model(x_all[i : i + batch_size]) for i in range(0, len(x_all), batch_size)]).numpy()

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        return classification_metrics(self.predict(model, split), self.splits.labels[split])
