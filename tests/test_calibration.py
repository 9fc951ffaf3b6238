"""Head calibration from class-wise feature statistics (fedge.tasks.calibration): the sites' sums
add up to the pooled statistics, the closed-form head is scikit-learn's LDA, and it repairs a head
that label-skewed training ruined, in the simulation as on a bare model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch import nn

from fedge.data import dirichlet_split
from fedge.models import ModelConfig, build_model
from fedge.tasks.calibration import FeatureStats, calibrate_head, feature_stats, lda_head, linear_head
from server.simulation import InProcessFederation, SimulationSettings
from server.strategies import get_strategy


def _cnn(seed: int = 0, num_classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="cnn", in_channels=1, num_classes=num_classes, image_size=28, options={"widths": [8, 16]}))


def _stats_of(features: np.ndarray, labels: np.ndarray, classes: int) -> FeatureStats:
    onehot = np.eye(classes)[labels]
    return FeatureStats(onehot.sum(0), onehot.T @ features, features.T @ features)


def test_site_statistics_add_up_to_the_pooled_ones(breast_task) -> None:
    model = _cnn()
    images, labels = breast_task.splits.images["train"], breast_task.splits.labels["train"]
    shards = dirichlet_split(labels, 4, 0.5, 0)
    parts = [feature_stats(model, images[idx], labels[idx], 2) for idx in shards]
    pooled = feature_stats(model, images, labels, 2)
    summed = sum(parts[1:], parts[0])
    assert summed.counts.tolist() == pooled.counts.tolist() == np.bincount(labels.reshape(-1)).tolist()
    np.testing.assert_allclose(summed.sums, pooled.sums, rtol=1e-6)  # float32 features: batches differ in the last bits
    np.testing.assert_allclose(summed.gram, pooled.gram, rtol=1e-6)  # float32 features: batches differ in the last bits
    assert model.training  # the caller's mode is restored
    assert summed.wire_floats == 2 + 2 * 16 + 16 * 17 // 2


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 0.5])
def test_the_head_is_sklearns_lda(shrinkage: float) -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (300, 6)), rng.normal(0.7, 1.3, (100, 6))]) @ rng.normal(size=(6, 6))
    y = np.array([0] * 300 + [1] * 100)
    weight, bias = lda_head(_stats_of(x, y, 2), shrinkage)
    ours = x @ weight.T + bias
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x, y)
    np.testing.assert_allclose(ours[:, 1] - ours[:, 0], ref.decision_function(x), rtol=1e-4, atol=1e-4)


def test_a_class_no_site_holds_is_never_predicted() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 4)), rng.integers(0, 2, 50)
    weight, bias = lda_head(_stats_of(x, y, 3), 0.1)  # class 2: no images anywhere
    assert ((x @ weight.T + bias).argmax(1) != 2).all()


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="shrinkage"):
        lda_head(_stats_of(np.ones((4, 2)), np.array([0, 1, 0, 1]), 2), 1.5)
    with pytest.raises(ValueError, match="at least 2 images"):
        lda_head(_stats_of(np.ones((1, 2)), np.array([0]), 2))
    denoiser = build_model(ModelConfig(arch="redcnn", in_channels=1, num_classes=1, image_size=32))
    with pytest.raises(ValueError, match="nn.Linear"):
        linear_head(denoiser)
    model = _cnn()
    model.head = nn.Linear(16, 2, bias=False)  # the LDA head has a bias it could not write
    with pytest.raises(ValueError, match="with a bias"):
        linear_head(model)


def test_calibration_repairs_a_ruined_head(breast_task) -> None:
    """Features trained on both classes, the head then flipped (it ranks malignant as benign): the
    LDA head from the train split's statistics ranks as well as the trained head again."""
    torch.set_num_threads(1)
    model = _cnn()
    breast_task.train_local(model, epochs=3, lr=1e-3, seed=0)
    trained = breast_task.evaluate(model)["auc"]
    with torch.no_grad():
        linear_head(model).weight.neg_()
        linear_head(model).bias.neg_()
    flipped = breast_task.evaluate(model)["auc"]
    splits = breast_task.splits
    calibrate_head(model, feature_stats(model, splits.images["train"], splits.labels["train"], 2))
    repaired = breast_task.evaluate(model)["auc"]
    assert flipped < 0.5 < trained - 0.05 < repaired, (trained, flipped, repaired)


def test_the_simulation_calibrates_from_every_sites_statistics(breast_task) -> None:
    torch.set_num_threads(1)
    settings = SimulationSettings(sites=4, rounds=1, alpha=0.5, codec="fp32", model_options={"widths": (8, 16)}, seed=0)
    fed = InProcessFederation(settings, breast_task, get_strategy("fedavg"))
    fed.run()
    before = fed.evaluate()[0]["auc"]
    metrics, nbytes = fed.calibrated()
    assert nbytes == 4 * (2 + 2 * 16 + 16 * 17 // 2)  # float32 counts, class sums, the Gram's upper triangle
    assert 0.5 < metrics["auc"] <= 1.0 and metrics["auc"] != before
    assert fed.evaluate()[0]["auc"] == before  # the global itself is left as it was
    with pytest.raises(ValueError, match="not fedbn"):
        InProcessFederation(settings, breast_task, get_strategy("fedbn")).calibrated()
