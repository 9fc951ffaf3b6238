"""Learning-rate schedules (fedge.schedule): the values by hand, and the server announcing each round's lr."""

from __future__ import annotations

import math

import pytest
from test_rounds_memory import Federation

from fedge.memory_transport import MemoryBroker
from fedge.protocol import TrainSettings
from fedge.schedule import scheduled_lr
from fedge.tasks.bounds import BoundSettings
from server.simulation import InProcessFederation, SimulationSettings
from server.strategies import get_strategy


def test_cosine_starts_at_lr_halves_midway_never_reaches_zero_and_constant_is_constant() -> None:
    assert scheduled_lr(1e-3, 1, 10, "cosine") == pytest.approx(1e-3)
    assert scheduled_lr(1e-3, 6, 10, "cosine") == pytest.approx(0.5e-3)  # (1 + cos(pi/2)) / 2
    assert scheduled_lr(1e-3, 10, 10, "cosine") == pytest.approx(1e-3 * (1 + math.cos(math.pi * 9 / 10)) / 2)
    lrs = [scheduled_lr(1e-3, r, 10, "cosine") for r in range(1, 11)]
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    assert {scheduled_lr(1e-3, r, 10) for r in range(1, 11)} == {1e-3}
    with pytest.raises(ValueError, match="constant, cosine"):
        scheduled_lr(1e-3, 1, 10, "step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="constant, cosine"):
        BoundSettings(sites=2, alpha=1.0, epochs=2, lr_schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="constant, cosine"):
        SimulationSettings(lr_schedule="linear")  # type: ignore[arg-type]


def test_the_server_announces_each_rounds_scheduled_lr(breast_task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), breast_task, tmp_path, rounds=2, train=TrainSettings(lr=2e-3), lr_schedule="cosine")
    fed.start_server()
    for site in ("site-1", "site-2"):
        fed.start_agent(site)
    fed.join()
    assert [a.train.lr for a in fed.announcements(1)] == [pytest.approx(2e-3)]
    assert [a.train.lr for a in fed.announcements(2)] == [pytest.approx(1e-3)]
    assert [len(r["clients"]) for r in fed.server.state.history] == [2, 2]


def test_the_simulation_trains_each_round_at_the_scheduled_lr(breast_task) -> None:
    settings = SimulationSettings(sites=2, rounds=2, codec="fp32", model_options={"widths": (4, 8)}, lr=2e-3, lr_schedule="cosine")
    fed = InProcessFederation(settings, breast_task, get_strategy("fedavg"))
    seen = []
    fed.on_round = lambda record: seen.append(fed.round_train.lr)
    fed.run()
    assert seen == [pytest.approx(2e-3), pytest.approx(1e-3)]
