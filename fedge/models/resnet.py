"""A CIFAR-style ResNet sized for 28x28/64x64 medical thumbnails (basic blocks, three stages)."""

from __future__ import annotations

from torch import nn

from fedge.models.registry import MODELS, ModelConfig


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...], blocks: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


@MODELS.register("resnet")
def build_resnet(config: ModelConfig) -> nn.Module:
    """Defaults give ResNet-8 (~78k params); widths (64,128,256,512) and blocks (2,2,2,2) give ~11M."""
    widths = tuple(config.options.get("widths", (16, 32, 64)))
    blocks = tuple(config.options.get("blocks", (1,) * len(widths)))
    if len(widths) != len(blocks):
        raise ValueError(f"resnet widths {widths} and blocks {blocks} must have the same length")
    return ResNet(config.in_channels, config.num_classes, widths, blocks)
