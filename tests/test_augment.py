"""Augmentation (fedge.tasks.augment): every augmented image is its original flipped and/or shifted by
whole pixels within the bound (nothing else), draws follow the seed, and the announced setting
reaches the agent's local step; refused where it cannot apply (DP-SGD, the denoiser)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_rounds_memory import MODEL, Federation

from fedge import weights as W
from fedge.errors import UsageError
from fedge.memory_transport import MemoryBroker
from fedge.models import build_model
from fedge.protocol import TrainSettings
from fedge.tasks import ClassificationTask
from fedge.tasks.augment import MAX_SHIFT, augment_batch


def _candidates(image: np.ndarray, bound: int) -> dict[tuple[bool, int, int], np.ndarray]:
    """Every flip/shift of a CHW image by numpy alone: edge padding, then the window at (dy, dx)."""
    out = {}
    for flip in (False, True):
        src = image[:, :, ::-1] if flip else image
        padded = np.pad(src, ((0, 0), (bound, bound), (bound, bound)), mode="edge")
        h, w = image.shape[1:]
        for dy in range(-bound, bound + 1):
            for dx in range(-bound, bound + 1):
                out[(flip, dy, dx)] = padded[:, bound + dy : bound + dy + h, bound + dx : bound + dx + w]
    return out


def test_each_augmented_image_is_its_original_flipped_or_shifted_by_whole_pixels(breast_task) -> None:
    from fedge.tasks.classification import preprocess

    x = preprocess(breast_task.splits.images["train"][:64])
    out = augment_batch(x, torch.Generator().manual_seed(3)).numpy()
    seen = []
    for original, augmented in zip(x.numpy(), out):
        matches = [k for k, c in _candidates(original, MAX_SHIFT).items() if np.array_equal(c, augmented)]
        assert matches, "an augmented image is no flip/shift of its original"
        seen.append(matches[0])
    assert {flip for flip, _, _ in seen} == {False, True}
    assert any((dy, dx) != (0, 0) for _, dy, dx in seen)
    assert not np.array_equal(out, x.numpy())


def test_draws_follow_the_seed() -> None:
    x = torch.randn(16, 1, 28, 28)
    a, b, c = (augment_batch(x, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_local_with_augment_is_deterministic_and_differs_from_without(breast_task) -> None:
    def trained(augment: bool) -> dict[str, np.ndarray]:
        torch.manual_seed(0)
        model = build_model(MODEL)
        breast_task.train_local(model, np.arange(32), epochs=1, seed=5, augment=augment)
        return W.float_state(model)

    plain, once, twice = trained(False), trained(True), trained(True)
    assert all(np.array_equal(once[k], twice[k]) for k in once)
    assert any(not np.array_equal(once[k], plain[k]) for k in once)


def test_augment_is_announced_bounded_by_dp_and_hidden_from_older_agents_when_off(breast_task) -> None:
    assert "augment" not in TrainSettings().model_dump_json()  # agents from before it still parse every announcement without it
    on = TrainSettings(augment=True)
    assert TrainSettings.model_validate_json(on.model_dump_json()) == on
    with pytest.raises(ValueError, match="DP-SGD"):
        TrainSettings(augment=True, dp_noise_multiplier=1.0)
    from fedge.tasks.dp import DPSettings

    with pytest.raises(ValueError, match="DP-SGD"):
        breast_task.train_local(build_model(MODEL), np.arange(8), augment=True, dp=DPSettings(1.0, 1.0, 1e-5))


def test_the_denoiser_refuses_augment() -> None:
    from fedge.tasks.ldct import LdctTask, PairSet

    empty = np.zeros((0, 8, 8), np.float32)
    task = LdctTask(PairSet(empty, empty, np.zeros((0, 2), np.float32)), PairSet(empty, empty, np.zeros((0, 2), np.float32)), 8)
    with pytest.raises(UsageError, match="classification"):
        task.train_local(torch.nn.Identity(), augment=True)


class _Recorded:
    """The real task, with the keyword arguments of each local step kept (what the agent asked for)."""

    def __init__(self, task: ClassificationTask) -> None:
        self._task, self.calls = task, []  # type: list[dict[str, Any]]

    def train_local(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self._task.train_local(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def test_the_announced_augment_reaches_every_local_step(breast_task, tmp_path) -> None:
    recorded = _Recorded(breast_task)
    fed = Federation(MemoryBroker(), recorded, tmp_path, rounds=1, train=TrainSettings(augment=True))  # type: ignore[arg-type]
    fed.start_server()
    for site in ("site-1", "site-2"):
        fed.start_agent(site)
    fed.join()
    assert [a.train.augment for a in fed.announcements(1)] == [True]
    assert len(recorded.calls) == 2 and all(call["augment"] is True for call in recorded.calls)
    assert [len(r["clients"]) for r in fed.server.state.history] == [2]
