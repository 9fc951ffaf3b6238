"""Differential privacy: the accountants against hand-computed epsilons, DP-SGD with opacus, the
Gaussian mechanism on updates, and DP-FedAvg at the server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compression import SparseTensor, TensorSpec
from fedge.data import ImageSplits
from fedge.models import ModelConfig, build_model
from fedge.tasks import ClassificationTask
from fedge.tasks.dp import (
    DPSettings,
    PrivacyLedger,
    gaussian_release,
    noise_multiplier_for,
)
from server.strategies import ClientUpdate, get_strategy
from server.validation import update_norm

OPACUS_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


def _to_epsilon(rdp: float, order: float, delta: float) -> float:
    """RDP -> (epsilon, delta) (Balle et al. 2020, Theorem 21), what opacus's accountant applies."""
    return rdp - (math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)


def test_client_level_epsilon_equals_the_gaussian_mechanism_by_hand() -> None:
    """DP-FedAvg with every site each round: T Gaussian mechanisms, RDP(a) = T a / (2 sigma^2)."""
    sigma, rounds, delta = 2.0, 15, 1e-5
    by_hand = min(_to_epsilon(rounds * a / (2 * sigma**2), a, delta) for a in OPACUS_ORDERS)
    assert by_hand == pytest.approx(10.313009696418233, abs=1e-12)  # the number, written down once
    assert PrivacyLedger([(sigma, 1.0, rounds)]).epsilon(delta) == pytest.approx(by_hand, rel=1e-12)
    strategy = get_strategy("dp_fedavg", noise_multiplier=sigma, seed=0)
    manifest = [TensorSpec("w", (3,))]
    for _ in range(rounds):
        strategy.aggregate([ClientUpdate("a", 1, {"w": np.ones(3, np.float32)}, 0)], manifest)
    assert strategy.round_metrics() == {"dp_epsilon": pytest.approx(by_hand, rel=1e-12), "dp_delta": delta}


def test_record_level_epsilon_equals_the_subsampled_gaussian_by_hand() -> None:
    """DP-SGD at a site: T Poisson-subsampled Gaussian steps; for integer orders
    RDP(a) = T/(a-1) log sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)) (Mironov et al. 2019)."""
    q, sigma, steps, delta = 0.05, 1.1, 300, 1e-5
    orders = list(range(2, 33))  # exp((a^2-a)/(2 sigma^2)) still fits a float

    def rdp(a: int) -> float:
        total = sum(math.comb(a, k) * (1 - q) ** (a - k) * q**k * math.exp((k * k - k) / (2 * sigma**2)) for k in range(a + 1))
        return steps * math.log(total) / (a - 1)

    by_hand = min(_to_epsilon(rdp(a), a, delta) for a in orders)
    ledger = PrivacyLedger([(sigma, q, 100), (sigma, q, 200)])  # three rounds of a site's training, two records
    assert ledger.epsilon(delta, orders=orders) == pytest.approx(by_hand, rel=1e-9)
    assert ledger.epsilon(delta) <= by_hand  # opacus's default grid adds fractional orders: never looser


def test_ledger_round_trips_and_refuses_another_schema() -> None:
    ledger = PrivacyLedger()
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(1.2, 0.1, 40)
    ledger.record(1.2, 0.1, 0)  # nothing released: nothing recorded
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.history == [(1.2, 0.1, 40)] and again.epsilon(1e-5) == ledger.epsilon(1e-5)
    with pytest.raises(ValueError, match="schema"):
        PrivacyLedger.from_json('{"schema_version": 99, "history": []}')


def test_noise_multiplier_for_meets_the_target() -> None:
    sigma = noise_multiplier_for(8.0, 1e-5, 0.08, 200)
    eps = PrivacyLedger([(sigma, 0.08, 200)]).epsilon(1e-5)
    assert 7.8 < eps <= 8.0


@pytest.mark.parametrize("field,value", [("noise_multiplier", 0.0), ("noise_multiplier", float("nan")), ("max_grad_norm", -1.0), ("delta", 1.0)])
def test_dp_settings_name_the_bad_field(field: str, value: float) -> None:
    kwargs = {"noise_multiplier": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        DPSettings(**kwargs)


def test_gaussian_release_clips_then_adds_noise_of_the_right_scale() -> None:
    rng = np.random.default_rng(0)
    delta = {"w": np.full(40_000, 0.05, np.float32), "b": np.full(10, 0.05, np.float32)}  # norm ~10
    out = gaussian_release(delta, clip=2.0, noise_multiplier=0.5, rng=rng)
    noise = out["w"] - delta["w"] * (2.0 / update_norm(delta))
    assert noise.std() == pytest.approx(1.0, rel=0.02) and abs(noise.mean()) < 0.02
    clean = gaussian_release(delta, clip=100.0, noise_multiplier=1e-9, rng=rng)  # inside the bound: unchanged
    np.testing.assert_allclose(clean["w"], delta["w"], atol=1e-6)


def _tiny_task() -> ClassificationTask:
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, size=(n, 8, 8, 1), dtype=np.uint8) for s, n in (("train", 96), ("val", 8), ("test", 16))}
    labels = {s: (images[s].reshape(len(images[s]), -1).mean(1) > 127).astype(np.int64) for s in images}
    return ClassificationTask(ImageSplits(images=images, labels=labels, name="tiny"))


def test_dp_sgd_trains_reports_its_releases_and_leaves_a_plain_model() -> None:
    task = _tiny_task()
    config = task.model_config("cnn", widths=(4, 8), norm="group")
    results, states = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(config)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        results.append(task.train_local(model, epochs=2, batch_size=16, seed=3, dp=DPSettings(1.0, max_grad_norm=0.5)))
        states.append(model.state_dict())
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not model._forward_hooks and not any(hasattr(p, "grad_sample") for p in model.parameters())
        assert type(model).__name__ == "SmallCNN"
    r = results[0]
    assert r.dp_sample_rate == pytest.approx(16 / 96) and r.dp_steps == 2 * 6 and r.num_samples == 96
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # same seed, same noise, same model


def test_dp_sgd_refuses_batchnorm_with_the_fix() -> None:
    task = _tiny_task()
    model = build_model(task.model_config("cnn", widths=(4,)))
    with pytest.raises(ValueError, match="norm=group"):
        task.train_local(model, dp=DPSettings(1.0))


def test_cnn_norm_option() -> None:
    config = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=8, options={"widths": (8, 16), "norm": "group"})
    model = build_model(config)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(k.endswith("running_var") for k in model.state_dict())
    with pytest.raises(ValueError, match="norm must be"):
        build_model(ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=8, options={"norm": "layer"}))


def test_dp_fedavg_clips_averages_and_noises_every_coordinate() -> None:
    d = 50_000
    manifest = [TensorSpec("w", (d,))]
    big = ClientUpdate("a", 10**6, {"w": SparseTensor((d,), np.arange(0, d, 100, dtype=np.int64), np.full(d // 100, 10.0, np.float32))}, 0)
    small = ClientUpdate("b", 1, {"w": SparseTensor((d,), np.array([1], np.int64), np.array([0.1], np.float32))}, 0)
    out = get_strategy("dp_fedavg", noise_multiplier=0.5, max_norm=1.0, seed=1).aggregate([big, small], manifest)["w"]
    expected = np.zeros(d)
    expected[::100] = 1.0 / math.sqrt(d // 100) / 2  # clipped to norm 1, equal weights despite 1e6 samples
    expected[1] = 0.05
    noise = out - expected
    assert np.count_nonzero(out) == d  # noise everywhere: the aggregate does not reveal which coordinates were sent
    assert noise.std() == pytest.approx(0.5 * 1.0 / 2, rel=0.02)


def test_dp_fedavg_resume_counts_the_rounds_already_published() -> None:
    strategy = get_strategy("dp_fedavg", noise_multiplier=2.0)
    strategy.resume(15)
    assert strategy.round_metrics()["dp_epsilon"] == pytest.approx(10.313009696418233, abs=1e-9)
    with pytest.raises(ValueError, match="sample_rate"):
        get_strategy("dp_fedavg", sample_rate=0.0)
