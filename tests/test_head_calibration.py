"""The live head-calibration round (`fedge server --calibrate-head`): after the last round the sites
send their feature statistics instead of a delta, and the server refits the final model's head as
LDA on their sum. Over the in-process broker here (seconds); tests/test_federation.py runs it over
amqtt. The attacks first: statistics no set of images has, a delta where statistics belong, a
lossy codec, and the rules under which a lying site must not be summed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from model_fixtures import BENCHMARKS, load_benchmark
from test_rounds_memory import FED, MODEL, Federation

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge import weights as W
from fedge.data import load_medmnist
from fedge.errors import UsageError
from fedge.memory_transport import MemoryBroker
from fedge.models import build_model
from fedge.rounds import Expected, Manifest, make_update
from fedge.tasks import ClassificationTask
from fedge.tasks.calibration import COUNTS, STATS_CODEC, SUMS, FeatureStats, calibrate_on_shards, shard_stats, stats_shapes
from server.config import ServerConfig
from server.intake import decode_update
from server.rounds import RoundServer


@pytest.fixture(scope="module")
def task(medmnist_root) -> ClassificationTask:
    return ClassificationTask(load_medmnist("breastmnist", medmnist_root))


def _model(weights: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(MODEL)
    W.load_float_state(model, weights)
    return model


def test_the_calibration_round_refits_the_head_from_the_sites_summed_statistics(task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), task, tmp_path, calibrate_head=True)
    fed.server.evaluator = task.evaluate
    fed.run()
    history = fed.server.state.history
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[-1]["head_calibration"] is True and history[-1]["calibration_images"] == 128
    assert all(agent.rounds_done == [1, 2, 3] and agent.finished for agent in fed.agents.values())
    assert fed.server.refusals.total == 0 and all(a.refusals.total == 0 for a in fed.agents.values())
    (ann,) = fed.announcements(3)
    assert ann.train.calibrate_head and ann.uplink_codec == STATS_CODEC
    assert not any(a.train.calibrate_head for r in (1, 2) for a in fed.announcements(r))
    # What the server fit equals the LDA head of the pooled statistics of the two sites' images
    # under the round-2 global (whose body the calibration round leaves as it was).
    final = fed.server.state.weights
    expected = _model(final)
    calibrate_on_shards(expected, task.splits, [fed.shards[0][:64], fed.shards[1][:64]])
    np.testing.assert_allclose(final["head.weight"], expected.head.weight.detach().numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(final["head.bias"], expected.head.bias.detach().numpy(), rtol=1e-3, atol=1e-4)
    # The checkpointed final model is the calibrated one, and its score is the round's record.
    assert history[-1]["auc"] == pytest.approx(task.evaluate(_model(final))["auc"])
    assert not np.allclose(history[-1]["auc"], history[-2]["auc"])


@pytest.mark.parametrize("mode", ["pruned", "qat"])
def test_the_calibration_round_in_the_compressed_modes(task, tmp_path, mode) -> None:
    """The pruned global's narrower head and QAT's fake-quantised one are refit as the plain one is
    (here with a lossy delta downlink: the calibration round starts from round 1's delta)."""
    from fedge.protocol import TrainSettings

    fed = Federation(MemoryBroker(), task, tmp_path, calibrate_head=True, rounds=1, train=TrainSettings(mode=mode), downlink_codec="q8,ef|zstd")
    fed.run()
    record = fed.server.state.history[-1]
    assert record["round"] == 2 and record["head_calibration"] is True and record["calibration_images"] == 128
    assert [a.downlink_kind for a in fed.announcements(2)] == ["delta"]
    assert fed.server.refusals.total == 0 and all(a.refusals.total == 0 and a.rounds_done == [1, 2] for a in fed.agents.values())
    assert fed.server.stats_manifest is not None
    dim = fed.server.stats_manifest.specs[1].shape[1]  # the head's inputs: 4 of the cnn's 8 once pruned
    assert fed.server.state.weights["head.weight"].shape == (2, dim) and (dim < 8) == (mode == "pruned")


def test_calibrate_head_on_a_finished_federation_runs_that_round_only(task, tmp_path) -> None:
    first = Federation(MemoryBroker(), task, tmp_path)
    first.run()
    trained = dict(first.server.state.weights)

    second = Federation(MemoryBroker(), task, tmp_path, calibrate_head=True)
    assert second.server.state.round == 2
    second.run()
    assert [r["round"] for r in second.server.state.history] == [1, 2, 3]
    assert all(agent.rounds_done == [3] for agent in second.agents.values())
    calibrated = second.server.state.weights
    assert all(np.array_equal(calibrated[k], v) for k, v in trained.items() if not k.startswith("head."))
    assert not np.array_equal(calibrated["head.weight"], trained["head.weight"])
    # A third start has nothing left to run: the calibration round is checkpointed like any round.
    assert Federation(MemoryBroker(), task, tmp_path, calibrate_head=True).server.state.round == 3


def test_a_site_that_does_not_share_statistics_refuses_the_round_and_the_quorum_calibrates(task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), task, tmp_path, calibrate_head=True, min_clients=1)
    fed.start_server()
    fed.start_agent("site-1")
    private = fed.start_agent("site-2", head_stats=False)
    refused = lambda: private.answered is not None and private.answered.round == 3  # noqa: E731
    fed.pass_deadline_once(3, {"site-2"}, "site-1's statistics and site-2's refusal of round 3", refused)
    fed.join()
    assert fed.server.state.history[-1]["clients"] == ["site-1"] and fed.server.state.history[-1]["calibration_images"] == 64
    assert private.rounds_done == [1, 2] and private.finished


def test_statistics_that_fit_no_head_leave_the_trained_head_and_the_federation_finishes(task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), task, tmp_path, calibrate_head=True, rounds=1, min_clients=1, expected_clients=("site-1",))
    fed.start_server()
    config = AgentConfig(broker="mqtt://unused:1", site="site-1", federation=FED, state_dir=tmp_path / "site-1")
    lone = Agent(config, task, fed.shards[0][:1])  # one image: no covariance to fit
    fed.agents["site-1"] = lone
    fed._thread(lambda: lone.run(transport=fed.broker.session), "site-1")
    fed.join()
    record = fed.server.state.history[-1]
    assert record["round"] == 2 and record["head_calibration"] is False and record["calibration_images"] == 1
    assert fed.server.refusals.counts["calibration-failed"] == 1 and lone.finished


@pytest.mark.integration
def test_the_live_round_scores_what_the_simulation_scores(medmnist_root, tmp_path, monkeypatch) -> None:
    """benchmarks/live_calibration.py end to end (one round, one seed): the federation over amqtt with
    its calibration round, beside the simulation of the same settings in the same process."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports noniid.py, as it does run from benchmarks/
    report = tmp_path / "live.json"
    cmd = ["live_calibration.py", "--report", str(report), "--seeds", "0", "--strategies", "fedavg", "--rounds", "1", "--data-dir", str(medmnist_root)]
    monkeypatch.setattr(sys, "argv", cmd)
    load_benchmark("live_calibration").main()
    data = json.loads(report.read_text())
    (fedavg,) = data["results"]
    for stage in ("trained", "calibrated"):
        (live,), (simulated,) = fedavg[f"live_{stage}_auc"]["per_seed"], fedavg[f"simulation_{stage}_auc"]["per_seed"]
        assert abs(live - simulated) < 0.01, (stage, live, simulated)
    assert (
        0.5 * fedavg["simulation_calibration_bytes_per_site"]
        < fedavg["calibration_uplink_bytes_per_site"]
        < 1.05 * fedavg["simulation_calibration_bytes_per_site"]
    )
    assert fedavg["rejected_updates"] == 0 and data["published_resnet18_28_auc"] == 0.901 and 0.5 < data["centralized_auc"]["mean"] <= 1.0


class LyingSite(Agent):
    """A selected site that holds its own signing key and lies in the calibration round: statistics no
    set of images has (its class sums scaled up), then a replay of its signed round-1 update."""

    trained: bytes | None = None

    def _train(self, ann):
        envelope = super()._train(ann)
        if not ann.train.calibrate_head:
            self.trained = envelope
        return envelope

    def _head_stats(self, ann) -> bytes:
        assert self.model is not None and self.held is not None
        W.load_float_state(self.model, self.held.weights)
        tensors = shard_stats(self.model, self.task.splits, self.indices).to_tensors()  # type: ignore[attr-defined]
        tensors[SUMS] = tensors[SUMS] * 10
        return make_update(tensors, codec=STATS_CODEC, federation=self.config.federation, site=self.config.site, round=ann.round, run=ann.run,
                           model_sha256=ann.model_sha256, num_samples=int(tensors[COUNTS].sum()), metrics={}, signer=self.signer)  # fmt: skip

    def _train_and_send(self, ann) -> None:
        super()._train_and_send(ann)
        if ann.train.calibrate_head and self.trained is not None:
            self._mq.publish_chunked(lambda i: self.topics.update_chunk(ann.round, self.config.site, i), self.trained, chunk_size=self.config.chunk_size)


@pytest.mark.integration
def test_a_lying_site_over_amqtt_is_refused_and_the_honest_ones_calibrate(task, tmp_path) -> None:
    """Over the embedded amqtt broker with signatures on: the liar's statistics (signed with its own
    key) are refused as statistics no images have, its replayed training update as stale (or dropped
    unread when it arrives before the round reopens for it), and at the deadline the quorum's head
    is the honest site's alone."""
    import threading

    from fedge.broker import EmbeddedBroker
    from fedge.cli.federation import signing_keys
    from fedge.data import dirichlet_split

    keys = signing_keys(tmp_path / "keys", ("site-1", "site-2"))
    shards = [s[:64] for s in dirichlet_split(task.splits.labels["train"], 2, 1.0, 0)]
    with EmbeddedBroker() as broker:
        server = RoundServer(
            ServerConfig(
                federation=FED,
                broker=broker.url,
                model=MODEL,
                checkpoint_dir=tmp_path / "ckpt",
                rounds=1,
                min_clients=1,
                expected_clients=("site-1", "site-2"),
                round_timeout=8,
                wait_for_clients=60,
                calibrate_head=True,
                trusted_keys=keys["trusted"],
                signing_key=keys["server"],
            )  # fmt: skip
        )
        agents = []
        for i, (site, cls) in enumerate((("site-1", Agent), ("site-2", LyingSite))):
            config = AgentConfig(broker=broker.url, site=site, federation=FED, state_dir=tmp_path / site, signing_key=keys[site], server_key=keys["server.pub"])
            agents.append(cls(config, task, shards[i]))
        threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
        for thread in threads:
            thread.start()
        server.run()
        for thread in threads:
            thread.join(60)
    record = server.state.history[-1]
    assert record["round"] == 2 and record["head_calibration"] is True
    assert record["clients"] == ["site-1"] and record["calibration_images"] == 64
    assert server.refusals.counts["bad-head-stats"] == 1
    assert server.refusals.counts["stale"] + server.refusals.counts["unexpected-topic"] >= 1
    reasons = [reason for _, client, reason in server.rejections if client == "site-2"]
    assert any("eigenvalue" in r for r in reasons), reasons
    expected = _model(server.state.weights)
    calibrate_on_shards(expected, task.splits, [shards[0]])
    np.testing.assert_allclose(server.state.weights["head.weight"], expected.head.weight.detach().numpy(), rtol=1e-3, atol=1e-4)
    assert all(agent.finished for agent in agents)


# ---- attacks on the round: what the server's intake does with each (server.intake.decode_update) ----


@pytest.fixture(scope="module")
def honest(task) -> FeatureStats:
    torch.manual_seed(0)
    return shard_stats(build_model(MODEL), task.splits, np.arange(50))


def _expected(stats: FeatureStats, **changes) -> Expected:
    shapes = stats_shapes(*stats.sums.shape)
    options = dict(federation=FED, run="a" * 32, round=3, model_sha256="0" * 64, selected=("site-1",), codec=STATS_CODEC,
                   manifest=Manifest.of({k: np.zeros(s, np.float32) for k, s in shapes.items()}), max_samples=1000, head_stats=True)  # fmt: skip
    return Expected(**(options | changes))


def _send(tensors: dict[str, np.ndarray], num_samples: int, codec: str = STATS_CODEC) -> bytes:
    return make_update(tensors, codec=codec, federation=FED, site="site-1", round=3, run="a" * 32, model_sha256="0" * 64,
                       num_samples=num_samples, metrics={})  # fmt: skip


def test_honest_statistics_pass_and_arrive_exactly(honest) -> None:
    decoded = decode_update(_send(honest.to_tensors(), 50), 3, "site-1", _expected(honest), None, max_norm=1.0)
    assert decoded.refusal is None and decoded.update is not None
    back = FeatureStats.from_tensors(decoded.update.delta)  # type: ignore[arg-type]
    np.testing.assert_array_equal(back.counts, honest.counts)
    np.testing.assert_allclose(back.gram, honest.gram, rtol=1e-6)  # float32 on the wire, lossless codec
    # The Gram matrix is far over any update norm bound: the round checks statistics, not norms.
    assert np.sqrt((honest.gram**2).sum()) > 1.0


def _forged(honest: FeatureStats, what: str) -> tuple[dict[str, np.ndarray], int]:
    tensors = honest.to_tensors()
    if what == "count-mismatch":  # claims more images (a bigger say) than its counts hold
        return tensors, 500
    if what == "negative-count":
        tensors[COUNTS] = tensors[COUNTS] * np.array([-1.0, 3.0], np.float32)
        return tensors, int(tensors[COUNTS].sum())
    if what == "fractional-count":
        tensors[COUNTS] = tensors[COUNTS] + np.array([0.5, -0.5], np.float32)
        return tensors, 50
    if what == "class-means-beyond-the-gram":  # sums scaled up: means no images of that Gram could have
        tensors[SUMS] = tensors[SUMS] * 10
        return tensors, 50
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["count-mismatch", "negative-count", "fractional-count", "class-means-beyond-the-gram"])
def test_statistics_no_set_of_images_has_are_refused(honest, what) -> None:
    tensors, claimed = _forged(honest, what)
    decoded = decode_update(_send(tensors, claimed), 3, "site-1", _expected(honest), None, max_norm=1e4)
    assert decoded.update is None and decoded.refusal is not None
    kind, reason = decoded.refusal
    assert kind == "bad-head-stats", decoded.refusal
    assert ("eigenvalue" in reason) if what.startswith("class-means") else ("class counts" in reason)


def test_non_finite_statistics_are_refused(honest) -> None:
    """The fp32 codec refuses NaN and Inf on both ends (tests/test_codecs_hostile.py); the statistics' own check does too."""
    sums = honest.sums.copy()
    sums[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        FeatureStats(honest.counts, sums, honest.gram).check(50)


def test_a_delta_or_a_lossy_codec_in_the_calibration_round_is_refused(honest) -> None:
    delta = {k: np.zeros(v.shape, np.float32) for k, v in W.float_state(build_model(MODEL)).items()}
    decoded = decode_update(_send(delta, 50), 3, "site-1", _expected(honest), None, max_norm=1e4)
    assert decoded.refusal is not None and decoded.refusal[0] == "wrong-manifest"
    decoded = decode_update(_send(honest.to_tensors(), 50, codec="fp16|zstd"), 3, "site-1", _expected(honest), None, max_norm=1e4)
    assert decoded.refusal is not None and decoded.refusal[0] == "wrong-codec"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"strategy": "median"}, "lying site"),
        ({"strategy": "trimmed_mean"}, "lying site"),
        ({"strategy": "dp_fedavg"}, "privacy guarantee"),
        ({"strategy": "fedbn"}, "normalisation layers"),
        ({"rounds_mode": "async"}, "synchronous"),
        ({"head_shrinkage": 2.0}, "[0, 1]"),
    ],
)
def test_rules_a_calibration_round_cannot_follow_are_refused_before_anything_starts(tmp_path, options, says) -> None:
    with pytest.raises(UsageError, match="calibrate-head|head_shrinkage") as err:
        ServerConfig(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp_path, calibrate_head=True, **options)
    assert says in str(err.value)


def test_dp_sgd_and_a_model_without_a_linear_head_are_refused(tmp_path) -> None:
    from fedge.protocol import TrainSettings

    with pytest.raises(ValueError, match="without the noise"):
        TrainSettings(dp_noise_multiplier=1.0, calibrate_head=True)
    with pytest.raises(UsageError, match="DP-SGD"):
        ServerConfig(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp_path, calibrate_head=True,
                     train=TrainSettings(dp_noise_multiplier=1.0))  # fmt: skip
    from fedge.tasks.ldct import denoiser_config

    denoiser = denoiser_config(32)
    with pytest.raises(UsageError, match="nn.Linear"):
        RoundServer(ServerConfig(federation=FED, broker="memory://", model=denoiser, checkpoint_dir=tmp_path / "d", calibrate_head=True))
    lora = TrainSettings(mode="lora", mode_options={"r": 2})
    with pytest.raises(UsageError, match="mode full, pruned or qat"):
        RoundServer(ServerConfig(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp_path / "l", calibrate_head=True, train=lora))
