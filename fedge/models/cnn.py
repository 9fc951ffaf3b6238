"""A small conv net: the fast default for CPU-only consoles and the demo."""

from __future__ import annotations

from torch import nn

from fedge.models.registry import MODELS, ModelConfig


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers.append(_block(cin, w))
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
    return SmallCNN(config.in_channels, config.num_classes, widths)
