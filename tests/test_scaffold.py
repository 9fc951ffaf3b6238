"""SCAFFOLD's control variates and the logit-adjusted loss: the local step's arithmetic, what the
server announces, keeps, checkpoints and resumes, what travels (through the same codec and the same
validation as the weights), and both end to end over the in-process broker and the simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_noniid_strategies import _globals
from test_rounds_memory import Federation
from test_strategies_server import _round, _server

from fedge import controlvariates as CV
from fedge import weights as W
from fedge.checkpoint import load_checkpoint
from fedge.data import load_medmnist
from fedge.errors import UsageError
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig, build_model
from fedge.protocol import TrainSettings
from fedge.rounds import make_update
from fedge.tasks import ClassificationTask
from fedge.tasks.classification import LocalTrainer, logit_bias
from server.config import ServerConfig
from server.simulation import InProcessFederation, SimulationSettings
from server.strategies import announced_train, get_strategy
from server.validation import RejectedUpdate, check_update

CNN = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})


# ---- the local step ------------------------------------------------------------------------------
def test_the_correction_is_added_to_every_gradient_and_the_raw_gradients_are_averaged() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    correction = {name: np.full(tuple(p.shape), 0.25, np.float32) for name, p in model.named_parameters()}
    step = CV.VariateStep(model, correction)
    trainer = LocalTrainer(model, variates=step)
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: the step is the corrected gradient
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    raw = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    trainer.step(x, y)
    for (name, p), g in zip(model.named_parameters(), raw):
        assert torch.allclose(before[name] - p.detach(), g + 0.25, atol=1e-6)
    trainer.step(x, y)
    mean = step.mean_gradient()
    assert step.steps == 2 and set(mean) == set(correction)
    assert not np.allclose(mean["weight"], raw[0].numpy() + 0.25)  # the raw gradients, not the corrected ones


def test_variates_for_parameters_the_model_lacks_are_refused() -> None:
    with pytest.raises(ValueError, match="lacks"):
        CV.VariateStep(torch.nn.Linear(2, 1), {"head.weight": np.zeros((1, 2), np.float32)})


def test_the_wire_names_round_trip_and_a_site_without_a_variate_corrects_by_c() -> None:
    model = build_model(CNN)
    zero = CV.zero_variates(model)
    assert zero and all(k.startswith(CV.PREFIX) for k in zero)
    assert {k.removeprefix(CV.PREFIX) for k in zero} == {n for n, p in model.named_parameters()}  # buffers have no variate
    weights, variates = CV.split(W.float_state(model) | zero)
    assert set(weights) == set(W.float_state(model)) and set(variates) == set(CV.parameter_names(model))
    c = {k: np.ones_like(v) for k, v in variates.items()}
    assert all(np.array_equal(v, c[k]) for k, v in CV.correction(c, {}).items())  # round 1 at a site: c_i = 0
    sent = CV.update_entries({k: 3 * v for k, v in c.items()}, c)
    assert all(k.startswith(CV.PREFIX) and np.array_equal(v, 2 * c[k.removeprefix(CV.PREFIX)]) for k, v in sent.items())


def test_the_logit_bias_is_tau_times_the_smoothed_log_prior() -> None:
    bias = logit_bias(np.array([1] * 98 + [0] * 2), 2, tau=1.0)
    assert torch.allclose(bias, torch.log(torch.tensor([3 / 102, 99 / 102])))
    assert torch.isfinite(logit_bias(np.ones(10, int), 3, tau=2.0)).all()  # a class the site never saw: finite


def test_logit_adjustment_keeps_a_skewed_site_from_teaching_its_prior(breast_task: ClassificationTask) -> None:
    """A site with 9 benign images to each malignant one: plain cross-entropy learns that prior into
    the model (the test images' mean logit gap leans to 'benign'); the adjusted loss leaves it to the
    prior term, which is not part of the model. (A site of one class alone gains nothing under Adam:
    its gradient keeps one direction whatever its size.)"""
    labels = breast_task.splits.labels["train"].reshape(-1)
    site = np.concatenate([np.flatnonzero(labels == 1)[:144], np.flatnonzero(labels == 0)[:16]])
    gaps = []
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model(CNN)
        breast_task.train_local(model, site, epochs=5, seed=1, logit_adjust=tau)
        logits = torch.from_numpy(breast_task.predict(model, "test"))
        gaps.append(float((logits[:, 1] - logits[:, 0]).mean()))
    assert gaps[1] < 0.5 * gaps[0]


def test_logit_adjustment_and_control_variates_are_refused_where_they_cannot_train(breast_task: ClassificationTask) -> None:
    from fedge.tasks.dp import DPSettings

    model = build_model(CNN.replace(options={"widths": [4, 8], "norm": "group"}))
    with pytest.raises(ValueError, match="not implemented with DP-SGD"):
        breast_task.train_local(model, np.arange(16), dp=DPSettings(1.0, 1.0, 1e-5), logit_adjust=1.0)
    with pytest.raises(ValueError, match="DP-SGD"):
        TrainSettings(dp_noise_multiplier=1.0, control_variates=True)
    with pytest.raises(UsageError, match="DP-SGD"):
        announced_train(TrainSettings(dp_noise_multiplier=1.0), get_strategy("scaffold"))
    with pytest.raises(ValueError):
        TrainSettings(logit_adjust=-1.0)


def test_an_agent_keeps_its_variate_and_a_damaged_file_costs_one_round_of_correction(tmp_path) -> None:
    from edge_client.state import AgentState

    state = AgentState(tmp_path)
    assert state.load_variates() == {}  # round 1: c_i = 0
    saved = {"head.weight": np.arange(4, dtype=np.float32).reshape(2, 2)}
    state.save_variates(saved)
    assert np.array_equal(AgentState(tmp_path).load_variates()["head.weight"], saved["head.weight"])  # across a restart
    (tmp_path / "control_variates.safetensors").write_bytes(b"\x00garbage")
    assert AgentState(tmp_path).load_variates() == {}


# ---- what the server announces, keeps and checkpoints -------------------------------------------
def test_announcements_leave_the_new_fields_out_at_their_defaults() -> None:
    assert "logit_adjust" not in TrainSettings().model_dump_json() and "control_variates" not in TrainSettings().model_dump_json()
    assert announced_train(TrainSettings(), get_strategy("scaffold")).control_variates
    used = TrainSettings(logit_adjust=1.0, control_variates=True)
    assert TrainSettings.model_validate_json(used.model_dump_json()) == used


def test_scaffold_needs_synchronous_rounds(tmp_path) -> None:
    with pytest.raises(UsageError, match="rounds-mode sync"):
        ServerConfig(federation="t", broker="mqtt://x:1", model=CNN, checkpoint_dir=tmp_path, strategy="scaffold", rounds_mode="async")


def test_the_server_variate_is_in_the_global_and_the_uplink_beside_an_exportable_checkpoint_and_resumes(tmp_path) -> None:
    server = _server(tmp_path, "scaffold")
    names = {k for k in server.state.weights if CV.is_variate(k)}
    assert names and names <= {t.name for t in server.uplink_manifest}
    assert all(not server.state.weights[k].any() for k in names)  # c = 0 before round 1
    server._advance(_round(server, {"a": 1e-3, "b": 3e-3}))
    moved = {k: server.state.weights[k] for k in names}
    assert all(np.allclose(v, 2e-3) for v in moved.values())  # c moved by the mean of the sites' changes
    checkpoint = load_checkpoint(server.store.model_path(1))
    assert not any(CV.is_variate(k) for k in checkpoint.state)  # the round checkpoint stays a plain model
    checkpoint.build()  # ... that `fedge export` builds
    saved = load_file(str(tmp_path / "ckpt" / "control_variates_0001.safetensors"))
    assert set(saved) == names
    again = _server(tmp_path, "scaffold")
    assert again.state.round == 1 and all(np.array_equal(again.state.weights[k], v) for k, v in moved.items())
    assert list(again.state.weights) == list(server.state.weights)  # the same order: the same model hash
    (tmp_path / "ckpt" / "control_variates_0001.safetensors").write_bytes(b"\x00damaged")
    with pytest.raises(ValueError, match="control_variates_0001.safetensors .*unreadable.*move it and state.json aside"):
        _server(tmp_path, "scaffold")


def test_a_forged_variate_is_refused_like_a_forged_weight(tmp_path) -> None:
    """The variates go through the update's validation: NaN or a huge change of c_i is refused, as in any tensor."""
    server = _server(tmp_path, "scaffold")
    name = next(k for k in server.state.weights if CV.is_variate(k))
    good = {t.name: np.zeros(t.shape, np.float32) for t in server.uplink_manifest}
    check_update(good, 1.0)
    for value in (np.nan, 1e6):
        forged = good | {name: np.full(server.state.weights[name].shape, value, np.float32)}
        with pytest.raises(RejectedUpdate):
            check_update(forged, 1e4)


def test_an_update_without_the_variates_or_with_extra_ones_is_refused(tmp_path) -> None:
    """A site that ignores the announcement (sends the model delta alone) or smuggles a tensor of its
    own under the prefix: the manifest digest no longer matches the round's, and read_update refuses."""
    from fedge.rounds import read_update
    from server.rounds import _Round

    server = _server(tmp_path, "scaffold")
    current = _Round(1, ("a",), 1e12, 0.0, 0, W.state_sha256(server.state.weights))
    expected = server._expected(current, "a")
    honest = {t.name: np.zeros(t.shape, np.float32) for t in server.uplink_manifest}

    def envelope(delta: dict[str, np.ndarray]) -> bytes:
        return make_update(delta, codec="fp32", federation="t", site="a", round=1, run=server.run_id, model_sha256=current.model_sha256,
                           num_samples=10, metrics={})  # fmt: skip

    assert set(read_update(envelope(honest), topic_client="a", expected=expected, verifier=None).delta) == set(honest)
    for forged in ({k: v for k, v in honest.items() if not CV.is_variate(k)}, honest | {CV.PREFIX + "extra": np.zeros(3, np.float32)}):
        with pytest.raises(RejectedUpdate, match="manifest"):
            read_update(envelope(forged), topic_client="a", expected=expected, verifier=None)


# ---- end to end ---------------------------------------------------------------------------------
def test_a_scaffold_federation_with_logit_adjustment_over_the_broker(breast_task: ClassificationTask, tmp_path) -> None:
    fed = Federation(MemoryBroker(), breast_task, tmp_path, strategy="scaffold", uplink_codec="topk:0.1,ef|q8|zstd",
                     train=TrainSettings(logit_adjust=1.0))  # fmt: skip
    fed.start_server()
    for site in ("site-1", "site-2"):
        fed.start_agent(site)
    fed.join()
    assert [len(r["clients"]) for r in fed.server.state.history] == [2, 2] and fed.server.refusals.total == 0
    announced = fed.announcements(2)
    assert announced and all(a.train.control_variates and a.train.logit_adjust == 1.0 for a in announced)
    sent = _globals(fed.broker)
    assert len(sent) >= 3 and all(any(CV.is_variate(n) for n in names) for names in sent)  # rounds 1, 2 and the final snapshot
    c = {k: v for k, v in fed.server.state.weights.items() if CV.is_variate(k)}
    assert c and any(np.abs(v).sum() > 0 for v in c.values())  # the sites' variates reached the server's
    for site, agent in fed.agents.items():
        own = load_file(str(tmp_path / site / "control_variates.safetensors"))
        assert set(own) == {k.removeprefix(CV.PREFIX) for k in c}
        assert agent.refusals.total == 0
    assert not any(CV.is_variate(k) for k in load_checkpoint(tmp_path / "ckpt" / "final.safetensors").state)


def test_scaffold_in_the_simulation_sends_the_variates_through_the_codec(breast_task: ClassificationTask) -> None:
    settings = SimulationSettings(sites=2, rounds=2, alpha=0.5, model_options={"widths": (4, 8)}, codec="topk:0.1,ef|q8|zstd", logit_adjust=1.0)
    plain = InProcessFederation(settings, breast_task, get_strategy("fedavg")).run()
    sim = InProcessFederation(settings, breast_task, get_strategy("scaffold"))
    result = sim.run()
    assert result["finite"] and 0.0 <= result["final_auc"] <= 1.0
    assert any(CV.is_variate(t.name) for t in sim.manifest)
    assert all(sim.site_variates[s] for s in sim.names)
    mean = lambda r: np.mean([h["uplink_bytes"] for h in r["history"]])  # noqa: E731
    assert 1.5 * mean(plain) < mean(result) < 3 * mean(plain)  # about twice FedAvg's uplink
    with pytest.raises(ValueError, match="custom trainer"):
        InProcessFederation(settings, breast_task, get_strategy("scaffold"), trainer=lambda *a: 1)


@pytest.mark.integration
def test_scaffold_with_logit_adjustment_over_mosquitto_with_a_delta_downlink(medmnist_root, tmp_path, mosquitto_broker) -> None:
    """Agents as separate processes, Mosquitto between them, sparse updates up and quantized deltas
    down: the variates ride both, the agents keep theirs, the checkpoints stay plain models."""
    from fedge.cli.federation import FederationSettings, run_federation

    host, port = mosquitto_broker
    settings = FederationSettings(dataset="breastmnist", data_dir=str(medmnist_root), clients=2, rounds=3, broker=f"mqtt://{host}:{port}",
                                  federation="scaffold", workdir=tmp_path / "run", codec="topk:0.1,ef|q8|zstd", downlink_codec="q8,ef|zstd",
                                  strategy="scaffold", logit_adjust=1.0)  # fmt: skip
    report = run_federation(settings)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and report["rejected_updates"] == 0
    assert report["rounds"][2]["downlink_bytes"] < report["rounds"][0]["downlink_bytes"] / 2  # deltas, c included
    folder = tmp_path / "run" / "checkpoints"
    c = load_file(str(folder / "control_variates_0003.safetensors"))
    assert c and any(np.abs(v).sum() > 0 for v in c.values())
    for site in ("site-1", "site-2"):
        own = load_file(str(tmp_path / "run" / "agents" / site / "control_variates.safetensors"))
        assert {CV.PREFIX + k for k in own} == set(c)
    model = load_checkpoint(report["checkpoint"]).build()
    assert not any(CV.is_variate(k) for k in model.state_dict())


def test_bad_combinations_are_refused_before_the_demo_touches_its_folder(medmnist_root, tmp_path) -> None:
    from fedge.cli.federation import FederationSettings, run_federation

    previous = tmp_path / "run" / "report.json"
    previous.parent.mkdir()
    previous.write_text("{}")
    for bad, match in (({"rounds_mode": "async"}, "rounds-mode sync"), ({"codec": "topk:0.1|q8"}, "add 'ef'"), ({"dp_noise_multiplier": 1.0}, "DP-SGD")):
        with pytest.raises((UsageError, ValueError), match=match):
            run_federation(FederationSettings(dataset="breastmnist", data_dir=str(medmnist_root), workdir=tmp_path / "run", strategy="scaffold", **bad))
        assert previous.read_text() == "{}"


def test_scaffold_under_lora_gives_variates_to_the_adapters_and_head_only(breast_task: ClassificationTask, tmp_path) -> None:
    fed = Federation(MemoryBroker(), breast_task, tmp_path, strategy="scaffold", train=TrainSettings(mode="lora"))
    fed.start_server()
    for site in ("site-1", "site-2"):
        fed.start_agent(site)
    fed.join()
    assert [len(r["clients"]) for r in fed.server.state.history] == [2, 2] and fed.server.refusals.total == 0
    names = [k.removeprefix(CV.PREFIX) for k in fed.server.state.weights if CV.is_variate(k)]
    assert names and all("lora_" in n or "head" in n for n in names)  # the frozen backbone has none


@pytest.mark.integration
def test_a_forged_update_without_the_variates_is_refused_over_mosquitto(medmnist_root, tmp_path, mosquitto_broker) -> None:
    """Any client of the broker sends, as site-1, a well-framed update of the right run, round and
    model that leaves out SCAFFOLD's variates (an agent that ignores the announcement): refused,
    counted, and the round completes with the real agents (separate processes)."""
    import threading
    import time

    from test_federation import _spawn_federation, finish_round

    from fedge.protocol import RoundAnnouncement, StatusMessage, Topics, open_record, sign_record
    from fedge.rounds import make_update
    from fedge.transport import MqttSession
    from server.rounds import RoundServer

    host, port = mosquitto_broker
    broker, federation = f"mqtt://{host}:{port}", "forged-scaffold"
    topics = Topics(federation)
    breast_model_config = ClassificationTask(load_medmnist("breastmnist", medmnist_root)).model_config("cnn")
    server = RoundServer(ServerConfig(federation=federation, broker=broker, model=breast_model_config, checkpoint_dir=tmp_path / "ckpt", rounds=1,
                                      min_clients=2, expected_clients=("site-1", "site-2"), round_timeout=120, strategy="scaffold"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    attacker = MqttSession(broker, "not-a-site", clean_session=True)
    try:
        attacker.subscribe(topics.announce(1))
        attacker.connect()
        for site in ("site-1", "site-2"):  # retained "online", as the agents would say it: the server opens round 1
            attacker.publish(topics.status(site), sign_record(StatusMessage(federation=federation, sender=site, state="online"), None), retain=True)
        message = attacker.get(timeout=120)
        assert message is not None, "round 1 was never announced"
        ann = open_record(message.payload, RoundAnnouncement, None, federation=federation)
        assert ann.train.control_variates
        forged = {t.name: np.zeros(t.shape, np.float32) for t in server.uplink_manifest if not CV.is_variate(t.name)}
        envelope = make_update(forged, codec="fp32", federation=federation, site="site-1", round=1, run=ann.run, model_sha256=ann.model_sha256,
                               num_samples=5, metrics={})  # fmt: skip
        attacker.publish_chunked(lambda i: topics.update_chunk(1, "site-1", i), envelope)
        deadline = time.monotonic() + 60
        while "manifest" not in " | ".join(detail for _, detail in server.refusals.recent):
            assert time.monotonic() < deadline, server.refusals.recent
            time.sleep(0.1)
    finally:
        attacker.close()
    _, agents = _spawn_federation(tmp_path, medmnist_root, broker, federation, 1)
    finish_round(thread, agents)
    assert "manifest" in " | ".join(detail for _, detail in server.refusals.recent)
    assert server.state.round == 1 and server.state.history[0]["clients"] == ["site-1", "site-2"]
    assert any(np.abs(v).sum() > 0 for k, v in server.state.weights.items() if CV.is_variate(k))  # the real sites' variates counted
