"""The non-IID strategies: FedProx's proximal term, FedAdam/FedYogi's server step against hand-computed
values (and a resume that continues bit for bit), FedBN's local normalisation layers (never in the
global, the checkpoint or an update), and both over the in-process broker end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rounds_memory import Federation
from test_strategies_server import _round, _server

from compression import TensorSpec
from fedge import weights as W
from fedge.errors import UsageError
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig, build_model
from fedge.protocol import Chunk, TrainSettings, decode_envelope
from fedge.tasks import ClassificationTask
from fedge.tasks.classification import LocalTrainer
from server.strategies import ClientUpdate, announced_train, get_strategy

CNN = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})


def _update(client: str, values: dict[str, float], samples: int = 1) -> ClientUpdate:
    return ClientUpdate(client, samples, {k: np.full((1,), v, np.float32) for k, v in values.items()}, 4)


# ---- FedProx -------------------------------------------------------------------------------------
def test_the_proximal_term_is_half_mu_times_the_squared_distance_from_the_round_start() -> None:
    model = torch.nn.Linear(2, 1)  # 3 parameters
    trainer = LocalTrainer(model, prox_mu=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert float(torch.as_tensor(trainer.proximal()).detach()) == pytest.approx(0.5 * 2.0 * 3 * 1.0**2)
    assert LocalTrainer(torch.nn.Linear(2, 1)).proximal() == 0.0


def test_fedprox_keeps_a_site_closer_to_the_global(breast_task: ClassificationTask) -> None:
    distances = []
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = build_model(CNN)
        start = W.float_state(model)
        breast_task.train_local(model, np.arange(64), epochs=1, seed=1, prox_mu=mu)
        distances.append(sum(float(((v - start[k]) ** 2).sum()) for k, v in W.float_state(model).items() if "running" not in k))
    assert distances[1] < 0.8 * distances[0]


def test_prox_mu_is_announced_bounded_and_older_announcements_still_parse() -> None:
    assert announced_train(TrainSettings(), get_strategy("fedprox", mu=0.1)).prox_mu == 0.1
    assert TrainSettings.model_validate_json('{"epochs": 2}').prox_mu == 0.0  # an announcement from before FedProx
    assert "prox_mu" not in TrainSettings().model_dump_json() and "local_norm" not in TrainSettings().model_dump_json()  # agents from before accept it
    used = TrainSettings(prox_mu=0.1, local_norm=True)
    assert TrainSettings.model_validate_json(used.model_dump_json()) == used
    with pytest.raises(ValueError):
        TrainSettings(prox_mu=1e4)
    with pytest.raises(UsageError, match="mu must be"):
        get_strategy("fedprox", mu=-1)
    with pytest.raises(UsageError, match="DP-SGD"):
        announced_train(TrainSettings(dp_noise_multiplier=1.0), get_strategy("fedprox"))


# ---- FedAdam / FedYogi ---------------------------------------------------------------------------
SPEC = [TensorSpec("w", (1,)), TensorSpec("bn.running_mean", (1,))]
ROUND = [_update("a", {"w": 0.5, "bn.running_mean": 1.0}), _update("b", {"w": 1.5, "bn.running_mean": 3.0})]  # mean w 1, stat 2


def test_fedadam_steps_as_computed_by_hand() -> None:
    rule = get_strategy("fedadam", lr=1.0, beta1=0.5, beta2=0.5, tau=0.5)
    first = rule.aggregate(ROUND, SPEC)
    # m = 0.5 * 1 = 0.5; v = 0.5 * 0.25 + 0.5 * 1 = 0.625; step = 0.5 / (sqrt(0.625) + 0.5)
    assert first["w"][0] == pytest.approx(0.5 / (0.625**0.5 + 0.5), rel=1e-6)
    assert first["bn.running_mean"][0] == pytest.approx(2.0)  # statistics: the plain mean
    assert rule.aggregate(ROUND, SPEC)["w"][0] == first["w"][0]  # the guard's re-run changes no state
    rule.commit()
    # m = 0.5 * 0.5 + 0.5 = 0.75; v = 0.5 * 0.625 + 0.5 = 0.8125
    assert rule.aggregate(ROUND, SPEC)["w"][0] == pytest.approx(0.75 / (0.8125**0.5 + 0.5), rel=1e-6)


def test_fedyogi_second_moment_as_computed_by_hand() -> None:
    rule = get_strategy("fedyogi", lr=1.0, beta1=0.5, beta2=0.5, tau=0.5)
    # v = 0.25 - 0.5 * 1 * sign(0.25 - 1) = 0.75; m = 0.5
    assert rule.aggregate(ROUND, SPEC)["w"][0] == pytest.approx(0.5 / (0.75**0.5 + 0.5), rel=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_a_resumed_server_optimizer_continues_bit_for_bit(tmp_path, name: str) -> None:
    scales = [{"a": 1e-3, "b": 3e-3}, {"a": -2e-3, "b": 1e-3}, {"a": 5e-4, "b": 2e-3}]
    straight = _server(tmp_path / "straight", name)
    for s in scales:
        straight._advance(_round(straight, s))
    first = _server(tmp_path / "resumed", name)
    for s in scales[:2]:
        first._advance(_round(first, s))
    again = _server(tmp_path / "resumed", name)  # a restart after round 2
    assert again.state.round == 2
    again._advance(_round(again, scales[2]))
    assert all(np.array_equal(straight.state.weights[k], again.state.weights[k]) for k in straight.state.weights)
    assert sorted(p.name for p in (tmp_path / "resumed" / "ckpt").glob("strategy_state*")) == ["strategy_state_0003.safetensors"]


def test_server_optimizer_options_are_checked() -> None:
    with pytest.raises(UsageError, match="beta2"):
        get_strategy("fedadam", beta2=1.0)
    with pytest.raises(UsageError, match="lr"):
        get_strategy("fedyogi", lr=0)


# ---- FedBN ---------------------------------------------------------------------------------------
def test_norm_layers_are_found_by_module_type() -> None:
    names = W.norm_layer_names(build_model(CNN))
    assert names and all(k.rsplit(".", 1)[-1] in {"weight", "bias", "running_mean", "running_var"} for k in names)
    group = W.norm_layer_names(build_model(CNN.replace(options={"widths": [4, 8], "norm": "group"})))
    assert group and not any("running" in k for k in group)  # GroupNorm: weight and bias, no statistics
    conv = [k for k, v in build_model(CNN).state_dict().items() if v.ndim == 4]
    assert not names & set(conv)


def test_fedbn_server_keeps_norm_layers_out_of_its_global_checkpoint_and_uplink_and_resumes(tmp_path) -> None:
    server = _server(tmp_path, "fedbn")
    local = W.norm_layer_names(server.template)
    assert server.train.local_norm and local
    assert not local & set(server.state.weights) and not local & {t.name for t in server.uplink_manifest}
    server._advance(_round(server, {"a": 1e-3, "b": 2e-3}))
    again = _server(tmp_path, "fedbn")
    assert again.state.round == 1 and set(again.state.weights) == set(server.state.weights)
    assert all(np.array_equal(again.state.weights[k], v) for k, v in server.state.weights.items())
    with pytest.raises(ValueError, match="lacks"):  # the same folder is no FedAvg checkpoint
        _server(tmp_path, "fedavg")


def test_an_agent_keeps_its_norm_layers_across_a_restart(tmp_path) -> None:
    from edge_client.state import AgentState

    trained = build_model(CNN)
    local = W.norm_layer_names(trained)
    with torch.no_grad():
        for k in local:
            trained.state_dict()[k].add_(0.5)
    AgentState(tmp_path).save_local(trained, local)
    fresh = build_model(CNN)
    AgentState(tmp_path).restore_local(fresh, local)  # a restarted agent's new model
    assert all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in local)


# ---- end to end over the in-process broker -------------------------------------------------------
def _globals(broker: MemoryBroker) -> list[list[str]]:
    """The tensor names of every global and snapshot envelope the server published."""
    parts: dict[bytes, dict[int, bytes]] = {}
    for m in broker.published:
        if m.payload and ("/global/" in m.topic or "/snapshot/" in m.topic):
            chunk = Chunk.decode(m.payload)
            parts.setdefault(chunk.transfer, {})[chunk.index] = chunk.data
    return [[e.name for e in decode_envelope(b"".join(p[i] for i in sorted(p))).header.manifest] for p in parts.values()]


def test_fedbn_and_fedprox_federations_end_to_end(breast_task: ClassificationTask, tmp_path) -> None:
    fed = Federation(MemoryBroker(), breast_task, tmp_path / "bn", strategy="fedbn", uplink_codec="topk:0.1,ef|q8|zstd")
    fed.start_server()
    for site in ("site-1", "site-2"):
        fed.start_agent(site)
    fed.join()
    local = W.norm_layer_names(fed.server.template)
    sent = _globals(fed.broker)
    assert len(sent) >= 3 and all(names and not local & set(names) for names in sent)  # rounds 1, 2 and the final snapshot
    assert not local & {t.name for t in fed.server.uplink_manifest}  # every accepted update was of this manifest
    assert [len(r["clients"]) for r in fed.server.state.history] == [2, 2] and fed.server.refusals.total == 0
    own = [{k: v.detach().clone() for k, v in a.model.state_dict().items() if k in local} for a in fed.agents.values()]
    assert any(not torch.equal(own[0][k], own[1][k]) for k in local)  # each site trained its own
    assert all((tmp_path / "bn" / site / "local_layers.safetensors").exists() for site in ("site-1", "site-2"))

    prox = Federation(MemoryBroker(), breast_task, tmp_path / "prox", strategy="fedprox", strategy_options={"mu": 0.1})
    prox.start_server()
    for site in ("site-1", "site-2"):
        prox.start_agent(site)
    prox.join()
    announced = [a.train.prox_mu for a in prox.announcements(1)]
    assert announced and set(announced) == {0.1} and [len(r["clients"]) for r in prox.server.state.history] == [2, 2]
