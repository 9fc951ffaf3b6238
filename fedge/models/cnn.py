"""A small conv net: the fast default for CPU-only consoles and the demo."""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from fedge.models.registry import MODELS, ModelConfig

Norm = Literal["batch", "group"]


def _block(cin: int, cout: int, norm: Norm) -> nn.Sequential:
    # GroupNorm keeps no batch statistics: what DP-SGD needs (per-sample gradients, nothing mixed
    # across a batch); its ReLU is not in place, since opacus's per-sample hooks forbid that.
    if norm == "batch":
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU())


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128), norm: Norm = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"cnn option norm must be 'batch' or 'group', got {norm!r}")
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers.append(_block(cin, w, norm))
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


@MODELS.register("cnn")
def build_cnn(config: ModelConfig) -> nn.Module:
    widths = tuple(config.options.get("widths", (32, 64, 128)))
    return SmallCNN(config.in_channels, config.num_classes, widths, config.options.get("norm", "batch"))
