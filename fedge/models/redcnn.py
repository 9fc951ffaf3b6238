"""RED-CNN (Chen et al. 2017), small: a residual encoder-decoder that predicts the noise of a
low-dose CT image, with normalization layers (so FedBN-style local normalization means something)
and optional FiLM conditioning on the scan protocol (in the spirit of HyperFed).

Input: `in_channels` = 1 image channel (HU / 1000) plus `cond` constant planes carrying the scan
protocol (`fedge.data.ldct.ScanProtocol.condition()`). The protocol travels as input planes rather
than a second input so every exporter, codec and training path keeps its one-tensor contract; the
network pools the planes back to a vector and a small MLP maps it to per-layer scales and shifts.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from fedge.models.registry import MODELS, ModelConfig

Norm = Literal["batch", "group", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


class FiLM(nn.Module):
    """(cond) -> per-layer (scale, shift); the last layer starts at zero, so FiLM starts as identity."""

    def __init__(self, cond: int, layers: int, width: int, hidden: int = 32):
        super().__init__()
        self.layers, self.width = layers, width
        self.net = nn.Sequential(nn.Linear(cond, hidden), nn.ReLU(), nn.Linear(hidden, 2 * layers * width))
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond).view(-1, self.layers, 2, self.width, 1, 1)


class RedCNN(nn.Module):
    def __init__(self, in_channels: int = 1, cond: int = 0, width: int = 32, depth: int = 4, norm: Norm = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"redcnn option norm must be 'batch', 'group' or 'none', got {norm!r}")
        if in_channels - cond != 1:
            raise ValueError(f"redcnn takes one image channel plus `cond` protocol planes: in_channels {in_channels} != 1 + cond {cond}")
        if depth < 2 or width < 4:
            raise ValueError(f"redcnn needs depth >= 2 and width >= 4, got depth {depth}, width {width}")
        self.cond = cond
        self.encoder = nn.ModuleList([nn.Conv2d(1 if i == 0 else width, width, 3, padding=1) for i in range(depth)])
        # RED-CNN's decoder "deconvolutions" have stride 1, which makes them plain convolutions: written
        # as Conv2d, LoRA (peft) can adapt them and int8 export quantizes them like the encoder.
        self.decoder = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 1)])
        self.norms = nn.ModuleList([_norm(norm, width) for _ in range(2 * depth - 1)])
        self.act = nn.ReLU()
        self.film = FiLM(cond, 2 * depth - 1, width) if cond else None
        self.head = nn.Conv2d(width, 1, 3, padding=1)  # named `head`: what LoRA mode trains fully
        nn.init.zeros_(self.head.weight)  # starts as the identity: the untrained denoiser returns its input
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def _layer(self, i: int, h: torch.Tensor, film: torch.Tensor | None) -> torch.Tensor:
        h = self.norms[i](h)
        if film is not None:
            h = h * (1.0 + film[:, i, 0]) + film[:, i, 1]
        return self.act(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x[:, :1]
        film = self.film(x[:, 1:].mean(dim=(2, 3))) if self.film is not None else None
        skips: list[torch.Tensor] = []
        h = image
        for i, conv in enumerate(self.encoder):
            h = self._layer(i, conv(h), film)
            skips.append(h)
        skips.pop()  # the deepest feature is the decoder's input
        depth = len(self.encoder)
        for j, deconv in enumerate(self.decoder):
            h = self._layer(depth + j, deconv(h) + skips.pop(), film)
        return image + self.head(h)  # residual: the network predicts the noise to remove


@MODELS.register("redcnn")
def build_redcnn(config: ModelConfig) -> nn.Module:
    return RedCNN(
        config.in_channels,
        int(config.options.get("cond", 0)),
        int(config.options.get("width", 32)),
        int(config.options.get("depth", 4)),
        config.options.get("norm", "batch"),
    )
