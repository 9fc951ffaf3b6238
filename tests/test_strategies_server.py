"""The round server with every strategy: options checked at configuration, a non-finite model never
applied or checkpointed under attack, DP-FedAvg's epsilon recorded each round and kept across a restart."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedge import weights as W
from fedge.errors import UsageError
from fedge.models import ModelConfig
from fedge.tasks.dp import PrivacyLedger
from server.config import ServerConfig
from server.rounds import RoundServer, _Round
from server.strategies import STRATEGIES, ClientUpdate
from server.validation import update_norm

MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})


def _server(tmp_path, strategy: str, **options) -> RoundServer:
    return RoundServer(
        ServerConfig(
            federation="t",
            broker="mqtt://127.0.0.1:1",
            checkpoint_dir=tmp_path / "ckpt",
            min_clients=1,
            model=MODEL,
            strategy=strategy,
            strategy_options=options,
            max_update_norm=float("inf"),
        )
    )


def _round(server: RoundServer, scales: dict[str, float], samples: int = 100) -> _Round:
    current = _Round(server.state.round + 1, tuple(scales), time.time() + 60, time.monotonic(), 0, W.state_sha256(server.state.weights))
    for site, scale in scales.items():
        delta = {t.name: np.full(t.shape, scale, np.float32) for t in server.uplink_manifest}
        current.updates[site] = ClientUpdate(site, samples, delta, 1, update_norm(delta))
    return current


def test_the_server_checks_strategy_names_and_options_before_it_starts(tmp_path) -> None:
    with pytest.raises(UsageError, match="choose one of"):
        ServerConfig(federation="t", broker="mqtt://x:1", model=MODEL, checkpoint_dir=tmp_path, strategy="krum")
    with pytest.raises(UsageError, match="beta"):
        ServerConfig(federation="t", broker="mqtt://x:1", model=MODEL, checkpoint_dir=tmp_path, strategy="trimmed_mean", strategy_options={"beta": 0.7})
    assert _server(tmp_path, "trimmed_mean", beta=0.1).strategy.beta == 0.1


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_no_strategy_lets_the_server_apply_or_checkpoint_a_non_finite_model(tmp_path, name: str) -> None:
    """Three honest sites and two sending 3e38 in every weight with the largest sample count."""
    server = _server(tmp_path, name)
    current = _round(server, {"h1": 1e-3, "h2": 2e-3, "h3": 1.5e-3, "m1": 3e38, "m2": 3.3e38}, samples=10**6)
    record = server._advance(current)
    if record is not None:
        assert all(np.isfinite(v).all() for v in server.state.weights.values())
    state, _ = server.store.load_latest() or (server.state, None)
    assert all(np.isfinite(v).all() for v in state.weights.values())


def test_dp_fedavg_epsilon_is_recorded_each_round_and_survives_a_restart(tmp_path) -> None:
    server = _server(tmp_path, "dp_fedavg", noise_multiplier=2.0, max_norm=0.1, seed=0)
    for _ in range(2):
        record = server._advance(_round(server, {"a": 1e-3, "b": 2e-3}))
    expected = PrivacyLedger([(2.0, 1.0, 2)]).epsilon(1e-5)
    assert record["dp_epsilon"] == pytest.approx(expected) and record["dp_delta"] == 1e-5
    assert server.state.history[-1]["dp_epsilon"] == pytest.approx(expected)
    again = _server(tmp_path, "dp_fedavg", noise_multiplier=2.0, max_norm=0.1, seed=0)  # resumes after round 2
    assert again.state.round == 2 and again.strategy.round_metrics()["dp_epsilon"] == pytest.approx(expected)
    record = again._advance(_round(again, {"a": 1e-3, "b": 2e-3}))
    assert record["dp_epsilon"] == pytest.approx(PrivacyLedger([(2.0, 1.0, 3)]).epsilon(1e-5))
