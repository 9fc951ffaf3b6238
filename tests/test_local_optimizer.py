"""The sites' local optimizer (TrainSettings.optimizer, fedge.tasks.optimizer): the step by hand,
why SGD is offered (a site with little left to learn moves little), what the server announces and
the agent follows, and the refusals of a name nobody implemented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rounds_memory import Federation

import fedge.tasks.classification as classification
from fedge import weights as W
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig, build_model
from fedge.protocol import TrainSettings
from fedge.tasks import ClassificationTask
from fedge.tasks.bounds import BoundSettings, centralized_auc, seeded_model
from fedge.tasks.classification import LocalTrainer
from fedge.tasks.optimizer import SGD_MOMENTUM, local_optimizer
from server.simulation import SimulationSettings

CNN = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})


def test_sgd_steps_lr_times_the_gradient_then_carries_momentum() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    trainer = LocalTrainer(model, lr=0.1, optimizer="sgd")
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["momentum"] == SGD_MOMENTUM
    grad = lambda: torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), [model.weight])[0]  # noqa: E731
    before, g1 = model.weight.detach().clone(), grad()
    trainer.step(x, y)
    assert torch.allclose(before - model.weight.detach(), 0.1 * g1, atol=1e-7)
    before, g2 = model.weight.detach().clone(), grad()
    trainer.step(x, y)
    assert torch.allclose(before - model.weight.detach(), 0.1 * (SGD_MOMENTUM * g1 + g2), atol=1e-7)
    assert isinstance(LocalTrainer(torch.nn.Linear(3, 2)).optimizer, torch.optim.Adam)  # the default stays Adam


def test_under_sgd_a_site_with_little_left_to_learn_moves_little(breast_task: ClassificationTask) -> None:
    """Why SGD is offered: with logit adjustment a site of benign images alone has a small loss from
    the start. SGD moves it in proportion; Adam normalises the gradient away and moves it about as
    far as a site of both classes."""
    labels = breast_task.splits.labels["train"].reshape(-1)
    one_class = np.flatnonzero(labels == 1)[:96]
    mixed = np.concatenate([np.flatnonzero(labels == 0)[:48], np.flatnonzero(labels == 1)[:48]])
    start = W.float_state(seeded_model(CNN)(0))

    def moved(indices: np.ndarray, optimizer: str, lr: float) -> float:
        model = build_model(CNN)
        W.load_float_state(model, start)
        breast_task.train_local(model, indices, epochs=1, lr=lr, seed=3, logit_adjust=1.0, optimizer=optimizer)
        after = W.float_state(model)
        return float(np.sqrt(sum(((after[k] - start[k]) ** 2).sum() for k in start if "running" not in k)))

    adam = moved(one_class, "adam", 1e-3) / moved(mixed, "adam", 1e-3)
    sgd = moved(one_class, "sgd", 0.2) / moved(mixed, "sgd", 0.2)
    assert adam > 0.5  # Adam: the one-class site moves comparably
    assert sgd < adam / 2  # SGD: it moves much less than the mixed site


def test_an_unknown_optimizer_is_refused_everywhere_with_the_choices() -> None:
    for build in (
        lambda: TrainSettings(optimizer="rmsprop"),  # type: ignore[arg-type]
        lambda: BoundSettings(sites=2, alpha=1.0, epochs=1, optimizer="rmsprop"),  # type: ignore[arg-type]
        lambda: SimulationSettings(optimizer="rmsprop"),  # type: ignore[arg-type]
        lambda: local_optimizer(torch.nn.Linear(2, 2).parameters(), "rmsprop", lr=0.1),
    ):
        with pytest.raises(ValueError, match="adam.*sgd"):
            build()


def test_the_default_is_left_out_of_the_announcement_for_older_agents() -> None:
    assert "optimizer" not in TrainSettings().model_dump_json()
    sgd = TrainSettings(optimizer="sgd", lr=0.2)
    assert '"optimizer":"sgd"' in sgd.model_dump_json()
    assert TrainSettings.model_validate_json(sgd.model_dump_json()) == sgd


def test_the_agent_trains_with_the_optimizer_the_server_announces(breast_task: ClassificationTask, tmp_path, monkeypatch) -> None:
    used: list[str] = []
    real = classification.local_optimizer

    def spy(params, name: str = "adam", **kwargs):
        used.append(name)
        return real(params, name, **kwargs)

    monkeypatch.setattr(classification, "local_optimizer", spy)
    fed = Federation(MemoryBroker(), breast_task, tmp_path, train=TrainSettings(optimizer="sgd", lr=0.05))
    fed.start_server()
    for site in ("site-1", "site-2"):
        fed.start_agent(site)
    fed.join()
    assert [len(r["clients"]) for r in fed.server.state.history] == [2, 2] and fed.server.refusals.total == 0
    assert all(a.train.optimizer == "sgd" for a in fed.announcements(1) + fed.announcements(2))
    assert used == ["sgd"] * 4  # two sites, two rounds


def test_the_bounds_train_with_the_announced_optimizer(breast_task: ClassificationTask) -> None:
    make = seeded_model(CNN)
    settings = dict(sites=2, alpha=1.0, epochs=2, lr=0.2)
    sgd = centralized_auc(breast_task, make, BoundSettings(**settings, optimizer="sgd"), 0)
    adam = centralized_auc(breast_task, make, BoundSettings(**settings), 0)
    assert sgd != adam and 0.5 < sgd <= 1.0  # a different step, and one that learns


def test_the_server_command_refuses_an_unknown_optimizer_before_it_starts() -> None:
    from typer.testing import CliRunner

    from fedge.cli.main import app

    result = CliRunner().invoke(app, ["server", "--local-optimizer", "rmsprop", "--data-dir", "/nonexistent"])
    assert result.exit_code == 2 and "invalid training settings" in result.output and "'adam' or 'sgd'" in result.output
