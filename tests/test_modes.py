"""The training-mode contract, run for every registered mode on a tiny ViT and a tiny CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedge.checkpoint import init_from_checkpoint, save_checkpoint
from fedge.models import ModelConfig, build_model
from fedge.modes import MODES, TrainingMode, get_mode, measure_step

CONFIGS = {
    "vit": ModelConfig("vit", 1, 2, 28, {"preset": "tiny"}),
    "cnn": ModelConfig("cnn", 1, 2, 28, {"widths": [8, 16]}),
}
# The contract runs on the CNN in the unit tier; the ViT cases (seconds each) in the integration tier.
ARCHS = ["cnn", pytest.param("vit", marks=pytest.mark.integration)]


def _site_model(mode: TrainingMode, config: ModelConfig, seed: int = 0) -> tuple[nn.Module, ModelConfig]:
    """What a site holds for `mode`: the server's (possibly pruned) architecture, prepared."""
    torch.manual_seed(seed)
    model = build_model(config)
    if mode.name == "pruned":
        torch.manual_seed(0)
        result = mode.prune(build_model(config), config)  # type: ignore[attr-defined]
        config = result.config
        model = build_model(config)
    return mode.prepare(model, config).eval(), config


def _train(model: nn.Module, steps: int = 2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 2, (8,), generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def test_registry_holds_the_four_modes() -> None:
    assert set(MODES) == {"full", "lora", "pruned", "qat"}


def test_unknown_mode_and_option_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="full"):
        get_mode("sparse")
    with pytest.raises(ValueError, match="alpha"):
        get_mode("lora", rank=4)
    with pytest.raises(ValueError, match="'r'"):
        get_mode("lora", r=0)
    with pytest.raises(ValueError, match="ratio"):
        get_mode("pruned", ratio=1.5)
    cnn = CONFIGS["cnn"]
    with pytest.raises(ValueError, match=r"\['qkv'\] match no Linear/Conv2d layer.*features\.0"):
        get_mode("lora", targets=["qkv"]).prepare(build_model(cnn), cnn)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(MODES))
def test_trained_state_moves_one_site_to_another(name: str, arch: str) -> None:
    mode = get_mode(name)
    site_a, config = _site_model(mode, CONFIGS[arch], seed=0)
    site_b, _ = _site_model(mode, CONFIGS[arch], seed=0)
    _train(site_a)
    x = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(site_a(x), site_b(x))

    mode.load_trainable(site_b, {k: v.clone() for k, v in mode.trainable_state(site_a).items()})

    torch.testing.assert_close(site_b(x), site_a(x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(MODES))
def test_export_is_a_plain_module_with_the_same_outputs(name: str, arch: str) -> None:
    mode = get_mode(name)
    model, config = _site_model(mode, CONFIGS[arch])
    _train(model)
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)

    exported = mode.export_model(model)

    torch.testing.assert_close(exported(x), expected, atol=1e-5, rtol=1e-4)
    plain = {k for k in exported.state_dict() if not k.endswith(".input_amax")}
    assert plain == set(build_model(config).state_dict())


def test_lora_trains_under_two_percent_of_the_5m_vit_and_only_adapters_and_head_travel() -> None:
    config = ModelConfig("vit", 1, 2, 28, {"preset": "small"})
    base = build_model(config)
    total = sum(p.numel() for p in base.parameters())
    mode = get_mode("lora")

    model = mode.prepare(base, config)
    state = mode.trainable_state(model)

    assert mode.trainable_params(model) / total <= 0.02
    assert sum(v.numel() for v in state.values()) == mode.trainable_params(model)
    assert all(".lora_A." in k or ".lora_B." in k or ".head." in k for k in state)
    assert any(".head." in k for k in state)


def test_lora_merge_changes_the_backbone_weights() -> None:
    mode = get_mode("lora", targets=("qkv", "fc2"))
    config = CONFIGS["vit"]
    torch.manual_seed(0)
    before = build_model(config).state_dict()
    torch.manual_seed(0)
    model = mode.prepare(build_model(config), config)
    _train(model)

    merged = mode.export_model(model).state_dict()

    assert not torch.equal(merged["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert torch.equal(merged["blocks.0.attn.proj.weight"], before["blocks.0.attn.proj.weight"])


def test_lora_train_norms_and_freeze_a_change_what_trains_and_travels() -> None:
    config = CONFIGS["vit"]
    plain, norms, ffa = (get_mode("lora", **o) for o in ({}, {"train_norms": True}, {"freeze_a": True}))
    torch.manual_seed(0)
    base = plain.trainable_state(plain.prepare(build_model(config), config))
    torch.manual_seed(0)
    with_norms = norms.prepare(build_model(config), config)
    torch.manual_seed(0)
    model = ffa.prepare(build_model(config), config)
    a_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_A." in k}

    _train(model)

    added = set(norms.trainable_state(with_norms)) - set(base)
    assert added and all(".norm" in k for k in added)
    state = ffa.trainable_state(model)
    assert set(state) == {k for k in base if ".lora_A." not in k}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a_before.items())  # A stays what the server sent
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if ".lora_B." in k)  # B learns


@pytest.mark.parametrize("name", sorted(MODES))
def test_load_trainable_refuses_a_state_from_another_mode(name: str) -> None:
    mode = get_mode(name)
    model, _ = _site_model(mode, CONFIGS["vit"])
    other = "lora" if name != "lora" else "full"
    foreign, _ = _site_model(get_mode(other), CONFIGS["vit"])

    with pytest.raises(ValueError, match="same --mode"):
        mode.load_trainable(model, get_mode(other).trainable_state(foreign))


def test_init_from_checkpoint_keeps_the_backbone_and_reinitialises_a_resized_head(tmp_path) -> None:
    pretrained = build_model(CONFIGS["vit"])
    path = save_checkpoint(tmp_path / "vit.safetensors", pretrained.state_dict(), CONFIGS["vit"])

    model, config = init_from_checkpoint(str(path), in_channels=1, num_classes=5, image_size=28)

    assert config.num_classes == 5 and model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    torch.testing.assert_close(model.state_dict()["blocks.1.fc2.weight"], pretrained.state_dict()["blocks.1.fc2.weight"])
    with pytest.raises(ValueError, match="same shape"):
        init_from_checkpoint(str(path), in_channels=3, num_classes=2, image_size=28)


def test_init_from_checkpoint_resets_the_head_for_another_dataset(tmp_path) -> None:
    pretrained = build_model(CONFIGS["cnn"])
    path = save_checkpoint(tmp_path / "cnn.safetensors", pretrained.state_dict(), CONFIGS["cnn"], dataset="pneumoniamnist")
    old_head = pretrained.state_dict()["head.weight"]

    same, _ = init_from_checkpoint(str(path), in_channels=1, num_classes=2, image_size=28, dataset="pneumoniamnist")
    other, config = init_from_checkpoint(str(path), in_channels=1, num_classes=2, image_size=28, dataset="breastmnist")

    assert config.num_classes == 2
    torch.testing.assert_close(same.state_dict()["head.weight"], old_head)
    assert not torch.equal(other.state_dict()["head.weight"], old_head)  # labels mean other things: fresh head
    for key in ("features.0.0.weight", "features.2.0.weight"):
        torch.testing.assert_close(other.state_dict()[key], pretrained.state_dict()[key])  # backbone kept


def test_measure_step_reports_memory_and_time() -> None:
    model = build_model(CONFIGS["cnn"])

    footprint = measure_step(lambda: _train(model, steps=1), repeats=2)

    assert footprint.peak_mem_mb > 10
    assert footprint.step_seconds > 0
