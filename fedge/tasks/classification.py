"""Image classification on MedMNIST-layout arrays: the local training step every site runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedge.data import ImageSplits
from fedge.models import ModelConfig
from fedge.tasks.metrics import classification_metrics


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]: the one input normalisation (training, export, bench)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    loss: float
    accuracy: float
    seconds: float


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
    ) -> TrainResult:
        """Train in place on the train split (or its `indices`); deterministic for a given seed."""
        images = self.splits.images["train"]
        labels = self.splits.labels["train"]
        if indices is not None:
            images, labels = images[indices], labels[indices]
        x_all = preprocess(images)
        y_all = torch.from_numpy(labels)
        generator = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
        for _ in range(epochs):
            order = torch.randperm(len(y_all), generator=generator)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a single sample
                    continue
                xb, yb = x_all[idx], y_all[idx]
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(idx)
        model.eval()
        return TrainResult(
            num_samples=len(y_all),
            loss=total_loss / max(seen, 1),
            accuracy=correct / max(seen, 1),
            seconds=time.perf_counter() - start,
        )

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str = "test", batch_size: int = 256) -> np.ndarray:
        model.eval()
        x_all = preprocess(self.splits.images[split])
        return torch.cat([model(x_all[i : i + batch_size]) for i in range(0, len(x_all), batch_size)]).numpy()

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        return classification_metrics(self.predict(model, split), self.splits.labels[split])
