"""A small Vision Transformer: the pretrained backbone that LoRA, pruning and QAT adapt on site.

Written with plain `nn.Linear` layers (qkv, proj, fc1, fc2) and explicit attention maths so that
peft can target the linear layers by name, torch-pruning can trace every channel dependency, and
ONNX export needs no fused-attention kernels. Widths are read from the weights at run time, so a
structurally pruned copy (narrower qkv/MLP/embedding) runs through the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fedge.models.registry import MODELS, ModelConfig


@dataclass(frozen=True)
class ViTSpec:
    """Transformer shape; `options` of a "vit" `ModelConfig` override any field or pick a preset."""

    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"vit option {name!r} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"vit option 'dim' ({self.dim}) must be divisible by 'heads' ({self.heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"vit option 'mlp_ratio' must be > 0, got {self.mlp_ratio}")


# "small" is the >= 5M-parameter foundation backbone (~6.0M at 28x28); "tiny" is for tests.
PRESETS: dict[str, ViTSpec] = {
    "tiny": ViTSpec(dim=32, depth=2, heads=2, mlp_ratio=2.0, patch_size=7),
    "small": ViTSpec(dim=288, depth=6, heads=6, mlp_ratio=4.0, patch_size=7),
    "base": ViTSpec(dim=384, depth=8, heads=6, mlp_ratio=4.0, patch_size=4),
}


class Attention(nn.Module):
    """Multi-head self-attention. Exposes `qkv` and `num_heads`, the names torch-pruning's
    head-aware pruning (compression.pruning) looks for; the head width follows `qkv`'s weight."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        head_dim = self.qkv.weight.shape[0] // (3 * self.num_heads)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * head_dim**-0.5
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, spec: ViTSpec):
        super().__init__()
        if image_size % spec.patch_size:
            raise ValueError(
                f"vit patch_size {spec.patch_size} does not divide image_size {image_size}; "
                "set options={'patch_size': ...} to a divisor (e.g. 7 for 28x28, 8 for 64x64)"
            )
        tokens = (image_size // spec.patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, spec.dim, spec.patch_size, spec.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.empty(1, tokens, spec.dim))
        self.blocks = nn.Sequential(*(Block(spec.dim, spec.heads, spec.mlp_ratio) for _ in range(spec.depth)))
        self.norm = nn.LayerNorm(spec.dim)
        self.head = nn.Linear(spec.dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_spec(options: dict) -> ViTSpec:
    """Resolve `options` ({"preset": name} and/or explicit fields) into a validated spec."""
    known = {"preset", *ViTSpec.__dataclass_fields__}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown vit options {unknown}; known: {sorted(known)}")
    preset = options.get("preset", "small")
    if preset not in PRESETS:
        raise ValueError(f"unknown vit preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in options.items() if k != "preset"})


@MODELS.register("vit")
def build_vit(config: ModelConfig) -> nn.Module:
    return ViT(config.in_channels, config.num_classes, config.image_size, vit_spec(config.options))
