"""Finding 7 of issue 11: a crash between two writes must leave a state the next start can use.

Each test makes the second write fail (as a kill between the two would) and restarts from disk.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_client.agent import Agent, _Global
from edge_client.config import AgentConfig
from fedge import weights as W
from fedge.data import load_medmnist
from fedge.models import ModelConfig, build_model
from fedge.modes import get_mode
from fedge.protocol import RoundAnnouncement, TransferInfo
from fedge.tasks import ClassificationTask
from server.config import ServerConfig
from server.rounds import RoundServer, _Round
from server.strategies import ClientUpdate

MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})


class Crash(Exception):
    """Stands for the process being killed at this point."""


def _server(folder) -> RoundServer:
    return RoundServer(ServerConfig(federation="crash", broker="mqtt://127.0.0.1:1", model=MODEL, checkpoint_dir=folder,
                                    downlink_codec="q8,ef|zstd", min_clients=1))  # fmt: skip


def _advance(server: RoundServer, rnd: int) -> None:
    rng = np.random.default_rng(rnd)
    delta = {t.name: rng.normal(0, 1e-2, t.shape).astype(np.float32) for t in server.uplink_manifest}
    current = _Round(rnd, ("site-1",), time.time() + 60, time.monotonic(), 0, W.state_sha256(server.state.weights))
    current.updates["site-1"] = ClientUpdate("site-1", 10, delta, 1, 1.0)
    assert server._advance(current) is not None


def test_the_server_downlink_residual_and_state_json_commit_together(tmp_path, monkeypatch) -> None:
    server = _server(tmp_path)
    _advance(server, 1)
    committed = server.downlink_residual.state_dict()
    assert (tmp_path / "downlink_residual_0001.safetensors").exists()

    def killed(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(server.store, "save", killed)  # round 2's residual is written, state.json is not
    with pytest.raises(Crash):
        _advance(server, 2)
    assert (tmp_path / "downlink_residual_0002.safetensors").exists()
    monkeypatch.undo()

    resumed = _server(tmp_path)
    assert resumed.state.round == 1
    restored = resumed.downlink_residual.state_dict()  # round 1's residual, not round 2's
    assert restored.keys() == committed.keys()
    assert all(np.array_equal(restored[k], committed[k]) for k in committed)
    _advance(resumed, 2)
    assert sorted(p.name for p in tmp_path.glob("downlink_residual*")) == ["downlink_residual_0002.safetensors"]


def test_the_agent_caches_its_update_before_it_commits_the_residual(tmp_path, medmnist_root, monkeypatch) -> None:
    """Killed after the update is cached but before the residual is saved: the restarted agent sends
    the cached update for the re-announced round and does not train the round a second time."""
    task = ClassificationTask(load_medmnist("breastmnist", medmnist_root))
    config = AgentConfig(broker="mqtt://127.0.0.1:1", site="site-1", federation="crash", state_dir=tmp_path, seed=0)
    model = build_model(MODEL)
    weights = W.float_state(model)
    transfer = TransferInfo(transfer="0" * 32, chunks=1, bytes=1, sha256="0" * 64)
    ann = RoundAnnouncement(round=1, deadline=time.time() + 60, model_sha256=W.state_sha256(weights), downlink=transfer,
                            downlink_kind="full", uplink_codec="topk:0.1,ef|q8", federation="crash", sender="server",
                            run="a" * 32)  # fmt: skip

    def ready_agent() -> Agent:
        agent = Agent(config, task, np.arange(64))
        agent.model, agent.mode = build_model(MODEL), get_mode("full")
        agent.held = _Global(0, MODEL, weights, ann.model_sha256)
        return agent

    agent = ready_agent()

    def killed() -> None:
        raise Crash

    monkeypatch.setattr(agent.state, "save_residual", killed)
    with pytest.raises(Crash):
        agent._train(ann)
    assert not (tmp_path / "residual.safetensors").exists()

    restarted = ready_agent()
    cached = restarted.state.last_update("crash", ann.run, 1, ann.model_sha256)
    assert cached is not None
    assert restarted.state.last_update("crash", "b" * 32, 1, ann.model_sha256) is None  # another run: retrain
    (tmp_path / "last_update.bin").write_bytes(cached[:-1] + bytes([cached[-1] ^ 1]))
    assert restarted.state.last_update("crash", ann.run, 1, ann.model_sha256) is None  # a torn cache is never sent
