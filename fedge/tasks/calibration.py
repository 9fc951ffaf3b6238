"""Head calibration from class-wise feature statistics: a closed-form linear head (LDA) for a
federated feature extractor.

Why: on label-skewed sites most of a federation's loss sits in its classifier, not its features
(docs/noniid.md: a head refit on the final global's features recovers most of BreastMNIST's gap).
CCVR (Luo et al., NeurIPS 2021) calibrates the head from each site's class-wise feature means and
covariances; Fed3R (Fanì et al., 2024) fits a closed-form head from the same kind of sums. The
sufficient statistics of LDA (per-class counts, per-class feature sums, one Gram matrix) add up over
sites exactly, so the head the server fits equals the one it would fit on the pooled features,
without any site sending a feature vector or an image. What a site sends is one
(C + C*D + D*(D+1)/2)-float record after training (BreastMNIST's cnn: 8,514 floats, 34 kB); like any
class mean it says more about a site's data than a model delta does, which is why it is a setting
and not the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedge.data import ImageSplits
from fedge.tasks.classification import preprocess

DEFAULT_SHRINKAGE = 0.1  # covariance shrinkage toward a scaled identity; docs/noniid.md has the choice
# How a site's statistics travel in a live calibration round: lossless (a sum of rounded sums is not the
# pooled statistic), in the tensors below; the server holds the shapes, from its model's head.
STATS_CODEC = "fp32|zstd"
COUNTS, SUMS, GRAM = "head_stats.counts", "head_stats.sums", "head_stats.gram_triu"
# A within-class scatter is positive semi-definite; float32 rounding on the wire moves its eigenvalues by
# about 1e-7 of its trace, so one below -PSD_TOLERANCE * trace was not computed from any images.
PSD_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FeatureStats:
    """One site's (or the sum of several sites') statistics of the head's input features."""

    counts: np.ndarray  # (C,) images per class
    sums: np.ndarray  # (C, D) per-class sum of feature vectors
    gram: np.ndarray  # (D, D) sum of x x^T over all images

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.counts + other.counts, self.sums + other.sums, self.gram + other.gram)

    @property
    def wire_floats(self) -> int:
        """Floats a site sends: counts, sums and the Gram matrix's upper triangle."""
        return sum(int(np.prod(shape)) for shape in stats_shapes(*self.sums.shape).values())

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The wire form (float32, in `stats_shapes` order): the Gram matrix as its upper triangle."""
        rows, cols = np.triu_indices(self.gram.shape[0])
        return {COUNTS: self.counts.astype(np.float32), SUMS: self.sums.astype(np.float32), GRAM: self.gram[rows, cols].astype(np.float32)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray]) -> FeatureStats:
        """The statistics of `to_tensors`' form, in float64 (unchecked: see `check`)."""
        counts, sums, triu = (np.asarray(tensors[k], dtype=np.float64) for k in (COUNTS, SUMS, GRAM))
        d = sums.shape[1]
        gram = np.zeros((d, d))
        gram[np.triu_indices(d)] = triu
        return cls(counts, sums, gram + np.triu(gram, 1).T)

    def check(self, num_samples: int) -> None:
        """ValueError unless these could be a site's statistics: finite, whole non-negative counts
        adding up to the images it claims, and a within-class scatter that is positive
        semi-definite, as any set of images gives. A site can still lie within these; that is why
        robust strategies refuse calibration."""
        if not all(np.isfinite(t).all() for t in (self.counts, self.sums, self.gram)):
            raise ValueError("head statistics hold NaN or Inf values")
        if (self.counts < 0).any() or (self.counts != np.round(self.counts)).any() or self.counts.sum() != num_samples:
            raise ValueError(f"class counts {self.counts.tolist()[:8]} are not whole non-negative numbers adding up to the {num_samples} images claimed")
        lowest = float(np.linalg.eigvalsh(self.within_scatter())[0]) if len(self.gram) else 0.0
        if lowest < -PSD_TOLERANCE * max(float(np.trace(self.gram)), 1e-12):
            raise ValueError(f"the within-class scatter has eigenvalue {lowest:.4g} < 0: no set of images has these statistics")

    def means(self) -> np.ndarray:
        """(C, D) class means (zero for a class with no images)."""
        present = self.counts > 0
        means = np.zeros_like(self.sums)
        means[present] = self.sums[present] / self.counts[present, None]
        return means

    def within_scatter(self) -> np.ndarray:
        """sum_c sum_i (x - mu_c)(x - mu_c)^T: the Gram matrix less what the class means explain."""
        present = self.counts > 0
        return self.gram - self.sums[present].T @ self.means()[present]


def stats_shapes(num_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the statistics of a head with `num_classes` outputs and `dim` inputs."""
    return {COUNTS: (num_classes,), SUMS: (num_classes, dim), GRAM: (dim * (dim + 1) // 2,)}


def linear_head(model: nn.Module) -> nn.Linear:
    """The model's classifier: a `head` that is an nn.Linear with a bias (the zoo's cnn, resnet and vit)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ValueError(f"head calibration needs a model whose `head` is an nn.Linear with a bias; {type(model).__name__} has {type(head).__name__}")
    return head


@torch.no_grad()
def feature_stats(model: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int = 256) -> FeatureStats:
    """Statistics of the head's input over (images, labels), the model in eval mode (BatchNorm's
    running statistics, as the model predicts)."""
    head = linear_head(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().double()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(preprocess(images[start : start + batch_size]))
    finally:
        hook.remove()
        model.train(was_training)
    feats = torch.cat(captured).numpy() if captured else np.zeros((0, head.in_features))
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    onehot = np.eye(num_classes)[y]
    return FeatureStats(onehot.sum(0), onehot.T @ feats, feats.T @ feats)


def lda_head(stats: FeatureStats, shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) of LDA with the pooled within-class covariance shrunk toward
    tr(S)/D * I: logit_c = x S^-1 mu_c - mu_c S^-1 mu_c / 2 + log prior_c. A class no site holds
    keeps a logit of -inf's stand-in (a bias of log(1e-12)) so it is never predicted."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    n = float(stats.counts.sum())
    if n < 2:
        raise ValueError("head calibration needs statistics of at least 2 images")
    means = stats.means()
    within = stats.within_scatter() / n
    d = within.shape[0]
    cov = (1.0 - shrinkage) * within + shrinkage * (np.trace(within) / d) * np.eye(d)
    weight = np.linalg.lstsq(cov, means.T, rcond=None)[0].T
    prior = np.maximum(stats.counts / n, 1e-12)
    bias = -0.5 * np.einsum("cd,cd->c", means, weight) + np.log(prior)
    return weight.astype(np.float32), bias.astype(np.float32)


def shard_stats(model: nn.Module, splits: ImageSplits, indices: np.ndarray | None) -> FeatureStats:
    """A site's statistics: over its indices of the train split (None: all of it)."""
    images, labels = splits.images["train"], splits.labels["train"]
    return feature_stats(model, images if indices is None else images[indices], labels if indices is None else labels[indices], splits.num_classes)


def calibrate_on_shards(model: nn.Module, splits: ImageSplits, shards: Sequence[np.ndarray | None], shrinkage: float = DEFAULT_SHRINKAGE) -> FeatureStats:
    """What a calibration round does: each shard of the train split (a site's indices; None: all of
    it) computes its statistics for `model`, they are summed, and the head is refit on the sum
    (returned, for its size)."""
    parts = [shard_stats(model, splits, idx) for idx in shards]
    total = sum(parts[1:], parts[0])
    calibrate_head(model, total, shrinkage)
    return total


def calibrate_head(model: nn.Module, stats: FeatureStats, shrinkage: float = DEFAULT_SHRINKAGE) -> None:
    """Replace the model's head by the LDA head of `stats`."""
    head = linear_head(model)
    weight, bias = lda_head(stats, shrinkage)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
