"""Data and task plumbing: any MedMNIST-layout npz (grayscale or RGB, any class count) trains unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedge.data import dirichlet_split, load_medmnist
from fedge.models import build_model
from fedge.tasks import ClassificationTask


def _write_rgb_npz(folder, name="rgbmnist", classes=4, n=160):
    """An RGB 4-class file in MedMNIST layout whose class is visible in the colour (so it is learnable)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 2)):
        labels = rng.integers(0, classes, size=(count, 1)).astype(np.uint8)
        images = rng.integers(0, 60, size=(count, 28, 28, 3)).astype(np.uint8)
        for c in range(classes):
            images[labels[:, 0] == c, :, :, c % 3] += np.uint8(60 * (1 + c // 3))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(folder / f"{name}.npz", **arrays)
    return name


@pytest.mark.integration
def test_rgb_multiclass_file_trains_with_no_code_change(tmp_path):
    name = _write_rgb_npz(tmp_path)
    splits = load_medmnist(name, tmp_path)
    assert (splits.channels, splits.num_classes, splits.image_size) == (3, 4, 28)
    task = ClassificationTask(splits)
    torch.manual_seed(0)  # the untrained model's AUC must not depend on which tests ran before in this process
    model = build_model(task.model_config("cnn"))
    before = task.evaluate(model)
    task.train_local(model, epochs=3, lr=3e-3, seed=0)
    after = task.evaluate(model)
    assert 0.0 <= before["auc"] <= 1.0
    assert after["auc"] > 0.9 > before["auc"]  # macro one-vs-rest AUC over the four classes


def test_local_training_is_deterministic_for_a_seed(medmnist_root):
    task = ClassificationTask(load_medmnist("breastmnist", medmnist_root))
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(task.model_config("cnn"))
        task.train_local(model, np.arange(64), epochs=1, seed=7)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_dirichlet_split_is_seeded_disjoint_and_skewed():
    labels = np.repeat([0, 1], 500)
    a, b = dirichlet_split(labels, 4, alpha=0.3, seed=1), dirichlet_split(labels, 4, alpha=0.3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    shares = [labels[s].mean() for s in a]
    assert max(shares) - min(shares) > 0.2  # label skew across sites
    with pytest.raises(ValueError, match="fewer sites"):
        dirichlet_split(labels[:20], 4, min_size=10)


def test_metrics_name_a_broken_model_instead_of_failing_inside_sklearn():
    from fedge.tasks.metrics import classification_metrics

    logits = np.array([[0.1, 0.9], [np.nan, 0.0], [0.8, 0.2]])
    with pytest.raises(ValueError, match="NaN or Inf for 1 of 3 images.*last checkpoint"):
        classification_metrics(logits, np.array([1, 0, 0]))
    assert classification_metrics(np.nan_to_num(logits), np.array([1, 0, 0]))["auc"] == 1.0
