"""Server-side structured pruning, and agents rebuilding exactly the server's architecture."""

from __future__ import annotations

import pytest
import torch

from fedge.checkpoint import load_checkpoint, save_checkpoint
from fedge.models import ModelConfig, build_model
from fedge.modes import get_mode

CONFIGS = [
    ModelConfig("vit", 1, 2, 28, {"preset": "tiny"}),
    ModelConfig("vit", 3, 4, 64, {"preset": "tiny", "patch_size": 8}),
    ModelConfig("resnet", 1, 2, 28, {"widths": [8, 16], "blocks": [1, 1]}),
    ModelConfig("cnn", 3, 2, 28, {"widths": [8, 16]}),
]


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.arch}-{c.image_size}")
def test_agent_rebuilds_the_servers_pruned_architecture(config: ModelConfig) -> None:
    mode = get_mode("pruned", ratio=0.5)
    server = mode.prune(build_model(config), config)

    # The config crosses the wire as JSON; the agent builds from it alone.
    agent = build_model(ModelConfig.from_json(server.config.to_json()))

    assert _shapes(agent) == _shapes(server.model)
    assert list(dict(agent.named_parameters())) == list(dict(server.model.named_parameters()))
    mode.load_trainable(agent, mode.trainable_state(server.model))
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    torch.testing.assert_close(agent.eval()(x), server.model.eval()(x))


def test_pruning_half_the_channels_cuts_params_and_macs() -> None:
    config = CONFIGS[0]
    result = get_mode("pruned", ratio=0.5).prune(build_model(config), config)

    assert result.stats.params_after < 0.5 * result.stats.params_before
    assert result.stats.macs_after < 0.5 * result.stats.macs_before
    assert result.stats.params_after == sum(p.numel() for p in result.model.parameters())
    assert result.model.blocks[0].attn.qkv.weight.shape[0] % (3 * result.model.blocks[0].attn.num_heads) == 0


def test_progressive_pruning_rebuilds_after_each_step(tmp_path) -> None:
    config = CONFIGS[0]
    mode = get_mode("pruned", ratio=0.25)
    first = mode.prune(build_model(config), config)

    second = mode.prune(first.model, first.config)

    assert second.stats.params_after < first.stats.params_after
    path = save_checkpoint(tmp_path / "pruned.safetensors", second.model.state_dict(), second.config)
    assert _shapes(load_checkpoint(path).build()) == _shapes(second.model)


def test_agents_refuse_an_unpruned_config() -> None:
    config = CONFIGS[0]

    with pytest.raises(ValueError, match="PrunedMode.prune"):
        get_mode("pruned").prepare(build_model(config), config)


def test_a_shape_record_from_another_model_is_refused() -> None:
    bad = ModelConfig("vit", 1, 2, 28, {"preset": "tiny", "pruned": {"blocks.0.fc1.weight": [99, 32]}})

    with pytest.raises(ValueError, match="does not fit"):
        build_model(bad)


def test_global_model_prunes_a_fresh_model_once_and_leaves_a_pruned_one_alone() -> None:
    config = CONFIGS[2]
    mode = get_mode("pruned", ratio=0.5)
    model, pruned_config, stats = mode.global_model(build_model(config), config)
    assert stats is not None and stats.params_after < stats.params_before and "pruned" in pruned_config.options

    # a checkpoint of a pruned federation (what `fedge bench` or a resumed server starts from)
    again, same_config, no_stats = mode.global_model(build_model(pruned_config), pruned_config)
    assert no_stats is None and same_config == pruned_config
    assert _shapes(again) == _shapes(model)
    assert get_mode("full").global_model(model, pruned_config)[1:] == (pruned_config, None)
