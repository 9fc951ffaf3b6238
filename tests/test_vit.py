"""The ViT backbone: sizes, input shapes, option validation."""

from __future__ import annotations

import pytest
import torch

from fedge.models import ModelConfig, build_model


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("image_size", "patch_size"), [(28, 7), (64, 8)])
def test_small_preset_is_a_5m_plus_backbone(image_size: int, patch_size: int) -> None:
    model = build_model(ModelConfig("vit", 1, 2, image_size, {"preset": "small", "patch_size": patch_size}))

    assert 5_000_000 <= _params(model) <= 10_000_000


@pytest.mark.parametrize(("channels", "image_size", "patch_size"), [(1, 28, 7), (3, 28, 4), (1, 64, 8), (3, 64, 16)])
def test_tiny_vit_classifies_every_input_shape(channels: int, image_size: int, patch_size: int) -> None:
    model = build_model(ModelConfig("vit", channels, 5, image_size, {"preset": "tiny", "patch_size": patch_size}))

    logits = model(torch.randn(3, channels, image_size, image_size))

    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all()


def test_explicit_options_override_the_preset() -> None:
    model = build_model(ModelConfig("vit", 1, 2, 28, {"preset": "tiny", "dim": 48, "depth": 3, "heads": 4}))

    assert len(model.blocks) == 3
    assert model.blocks[0].attn.qkv.weight.shape == (144, 48)
    assert model.blocks[0].attn.num_heads == 4


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"preset": "tiny", "patch_size": 5}, "patch_size"),
        ({"preset": "tiny", "dim": 30, "heads": 4}, "heads"),
        ({"preset": "huge"}, "preset"),
        ({"preset": "tiny", "width": 3}, "width"),
    ],
)
def test_bad_options_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_model(ModelConfig("vit", 1, 2, 28, options))
