"""Every aggregation strategy against a dense numpy reference on small hand-made sparse and dense updates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compression import (
    SparseTensor,
    TensorSpec,
    UpdateCodec,
    gram_matrix,
    order_statistic_mean,
)
from server.strategies import (
    STRATEGIES,
    ClientUpdate,
    Strategy,
    get_strategy,
    register_strategy,
)
from server.strategies.multikrum import krum_scores

MANIFEST = [TensorSpec("w", (4, 5)), TensorSpec("b", (5,))]


def _sparse(dense: np.ndarray, keep: np.ndarray) -> SparseTensor:
    idx = np.flatnonzero(keep.reshape(-1)).astype(np.int64)
    return SparseTensor(dense.shape, idx, dense.reshape(-1)[idx].astype(np.float32))


def _updates(n: int, seed: int = 0, sparse: bool = True, density: float = 0.4) -> list[ClientUpdate]:
    """n updates; sparse ones keep a random subset of coordinates (ties and zeros included on purpose)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        delta = {}
        for spec in MANIFEST:
            values = rng.integers(-3, 4, size=spec.shape).astype(np.float32) * np.float32(0.5)  # many ties
            delta[spec.name] = _sparse(values, rng.random(spec.shape) < density) if sparse else values
        out.append(ClientUpdate(f"site-{i}", int(rng.integers(1, 100)), delta, 0))
    return out


def _dense(update: ClientUpdate) -> dict[str, np.ndarray]:
    return {k: (v.to_dense() if isinstance(v, SparseTensor) else v).astype(np.float64) for k, v in update.delta.items()}


def _stack(updates: list[ClientUpdate], name: str) -> np.ndarray:
    return np.stack([_dense(u)[name] for u in updates])


def _flat(update: ClientUpdate) -> np.ndarray:
    return np.concatenate([_dense(update)[s.name].reshape(-1) for s in MANIFEST])


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_median_and_trimmed_mean_equal_numpy(n: int, sparse: bool) -> None:
    updates = _updates(n, seed=n, sparse=sparse)
    median = get_strategy("median").aggregate(updates, MANIFEST)
    trimmed = get_strategy("trimmed_mean", beta=0.2).aggregate(updates, MANIFEST)
    b = int(np.floor(0.2 * n))
    for spec in MANIFEST:
        stack = _stack(updates, spec.name)
        np.testing.assert_allclose(median[spec.name], np.median(stack, axis=0), atol=1e-7)
        np.testing.assert_allclose(trimmed[spec.name], np.sort(stack, axis=0)[b : n - b].mean(axis=0), atol=1e-7)
        assert median[spec.name].dtype == np.float32 and median[spec.name].shape == spec.shape


def test_order_statistics_mix_sparse_and_dense_and_signed_zeros() -> None:
    column = [
        SparseTensor((4,), np.array([0, 2], np.int64), np.array([-0.0, 5.0], np.float32)),
        np.array([1.0, -2.0, 0.0, 3.0], np.float32),
        SparseTensor((4,), np.array([1, 2, 3], np.int64), np.array([-1.0, -7.0, 2.0], np.float32)),
    ]
    stack = np.stack([c.to_dense() if isinstance(c, SparseTensor) else c for c in column])
    np.testing.assert_allclose(order_statistic_mean(column, 1, 2), np.median(stack, axis=0))
    sparse_only = [c for c in column if isinstance(c, SparseTensor)] + [SparseTensor((4,), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    dense = np.stack([c.to_dense() for c in sparse_only])
    for lo, hi in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        np.testing.assert_allclose(order_statistic_mean(sparse_only, lo, hi), np.sort(dense, axis=0)[lo:hi].mean(0))
    with pytest.raises(ValueError, match="window"):
        order_statistic_mean(sparse_only, 2, 2)


@pytest.mark.parametrize("mixed", [False, True])
def test_gram_matrix_equals_dense_products(mixed: bool) -> None:
    updates = _updates(6, seed=3, sparse=True)
    if mixed:  # one update sends "b" dense, as a dense-coded tensor would
        updates[2].delta["b"] = updates[2].delta["b"].to_dense()
    flat = np.stack([_flat(u) for u in updates])
    np.testing.assert_allclose(gram_matrix([u.delta for u in updates], MANIFEST), flat @ flat.T, rtol=1e-12, atol=1e-12)
    dense_updates = _updates(4, seed=4, sparse=False)
    flat = np.stack([_flat(u) for u in dense_updates])
    np.testing.assert_allclose(gram_matrix([u.delta for u in dense_updates], MANIFEST), flat @ flat.T, rtol=1e-12)


def test_krum_scores_match_hand_computed_distances() -> None:
    updates = _updates(7, seed=5)
    flat = [_flat(u) for u in updates]
    f = 2
    expected = []
    for i in range(7):
        dists = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(7) if j != i)
        expected.append(sum(dists[: 7 - f - 2]))
    gram = gram_matrix([u.delta for u in updates], MANIFEST)
    np.testing.assert_allclose(krum_scores(gram, f), expected, rtol=1e-9)


def test_multikrum_averages_the_lowest_scores_and_leaves_out_an_outlier() -> None:
    updates = _updates(7, seed=6)
    outlier = ClientUpdate(
        "site-x", 10, {k: v * 100 if isinstance(v, np.ndarray) else SparseTensor(v.shape, v.indices, v.values * 100) for k, v in updates[0].delta.items()}, 0
    )
    everyone = updates + [outlier]
    strategy = get_strategy("multikrum", f=2)
    ordered = sorted(everyone, key=lambda u: u.client)
    chosen = strategy.choose(ordered, MANIFEST)
    assert len(chosen) == 6 and ordered.index(outlier) not in chosen
    result = strategy.aggregate(everyone, MANIFEST)
    for spec in MANIFEST:
        expected = np.mean([_dense(ordered[i])[spec.name] for i in chosen], axis=0)
        np.testing.assert_allclose(result[spec.name], expected, atol=1e-6)
    krum = get_strategy("multikrum", f=2, selected=1).aggregate(everyone, MANIFEST)
    np.testing.assert_allclose(krum["w"], _dense(ordered[chosen[0]])["w"], atol=1e-7)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    updates = _updates(5, seed=7)
    result = get_strategy("fedavg").aggregate(updates, MANIFEST)
    w = np.array([u.num_samples for u in updates], np.float64)
    for spec in MANIFEST:
        np.testing.assert_allclose(result[spec.name], np.tensordot(w / w.sum(), _stack(updates, spec.name), 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"max_norm": 1.5}, {}, {"multiplier": 0.5, "weighted": True}])
def test_clipping_equals_clipped_reference(options: dict) -> None:
    updates = _updates(6, seed=8, sparse=True)
    norms = np.array([np.linalg.norm(_flat(u)) for u in updates])
    bound = options.get("max_norm", options.get("multiplier", 1.0) * np.median(norms))
    w = np.array([u.num_samples if options.get("weighted") else 1.0 for u in updates])
    result = get_strategy("clipping", **options).aggregate(updates, MANIFEST)
    for spec in MANIFEST:
        clipped = _stack(updates, spec.name) * np.minimum(1.0, bound / norms).reshape(-1, *([1] * len(spec.shape)))
        np.testing.assert_allclose(result[spec.name], np.tensordot(w / w.sum(), clipped, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"tau": 0.8, "iterations": 5}])
def test_centered_clipping_equals_dense_reference(options: dict) -> None:
    updates = _updates(6, seed=9, sparse=True)
    flat = np.stack([_flat(u) for u in updates])
    center = np.zeros(flat.shape[1])
    for _ in range(options.get("iterations", 3)):
        dist = np.linalg.norm(flat - center, axis=1)
        tau = options.get("tau", np.median(dist))
        scale = np.minimum(1.0, tau / dist)
        center = center + (scale[:, None] * (flat - center)).mean(axis=0)
    result = get_strategy("centered_clipping", **options).aggregate(updates, MANIFEST)
    np.testing.assert_allclose(np.concatenate([result[s.name].reshape(-1) for s in MANIFEST]), center, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_returns_manifest_shaped_float32(name: str) -> None:
    for updates in (_updates(5, seed=10), _updates(5, seed=11, sparse=False), _updates(1, seed=12)):
        result = get_strategy(name).aggregate(updates, MANIFEST)
        assert list(result) == [s.name for s in MANIFEST]
        assert all(result[s.name].shape == s.shape and result[s.name].dtype == np.float32 for s in MANIFEST)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_takes_real_decoded_updates(name: str) -> None:
    rng = np.random.default_rng(0)
    codec = UpdateCodec.from_spec("topk:0.2,ef|ternary|zstd")
    manifest = UpdateCodec.manifest({"w": np.zeros((8, 8), np.float32), "bn.running_var": np.zeros(8, np.float32)})
    updates = []
    for i in range(5):
        delta = {"w": rng.normal(size=(8, 8)).astype(np.float32), "bn.running_var": rng.normal(size=8).astype(np.float32)}
        decoded = codec.decode(codec.encode(delta, keep_dense=["bn.running_var"], seed=i), manifest)
        updates.append(ClientUpdate(f"s{i}", 10, decoded, 0))
    assert isinstance(updates[0].delta["w"], SparseTensor) and isinstance(updates[0].delta["bn.running_var"], np.ndarray)
    result = get_strategy(name).aggregate(updates, manifest)
    assert all(np.isfinite(v).all() for v in result.values())


def test_get_strategy_errors_name_what_is_valid() -> None:
    with pytest.raises(ValueError, match="choose one of .*fedavg.*median"):
        get_strategy("krumm")
    with pytest.raises(ValueError, match=r"no option fraction; its options: beta \(default 0.2\)"):
        get_strategy("trimmed_mean", fraction=0.1)
    with pytest.raises(ValueError, match="beta"):
        get_strategy("trimmed_mean", beta=0.5)
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        get_strategy("clipping", max_norm=-1)
    with pytest.raises(ValueError, match="multiplier scales the adaptive"):
        get_strategy("clipping", max_norm=1.0, multiplier=2.0)
    with pytest.raises(ValueError, match="option f"):
        get_strategy("multikrum", f=-1)
    with pytest.raises(ValueError, match="iterations"):
        get_strategy("centered_clipping", iterations=0)


def test_registry_refuses_a_duplicate_name_and_strategies_are_frozen() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_strategy("median")
        @dataclasses.dataclass(frozen=True)
        class Other(Strategy):
            def aggregate(self, updates, manifest):  # pragma: no cover - never called
                return {}

    with pytest.raises(dataclasses.FrozenInstanceError):
        get_strategy("trimmed_mean").beta = 0.3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["clipping", "trimmed_mean", "multikrum", "centered_clipping"])
def test_vector_rules_take_the_median_of_batchnorm_statistics(name: str) -> None:
    """Two sites push running_var down by 100 (every output NaN once it is negative); seven honest
    ones raise it by 0.01. The statistics' median ignores the two, and the rule itself sees weights only."""
    manifest = [TensorSpec("conv.weight", (4, 3)), TensorSpec("bn.running_var", (4,)), TensorSpec("bn.running_mean", (4,))]
    rng = np.random.default_rng(13)
    updates = []
    for i in range(9):
        bad = i >= 7
        delta = {
            "conv.weight": rng.normal(size=(4, 3)).astype(np.float32) * np.float32(0.01),
            "bn.running_var": np.full(4, -100.0 if bad else 0.01, np.float32),
            "bn.running_mean": np.full(4, 0.02 * i, np.float32),
        }
        updates.append(ClientUpdate(f"s{i}", 10, delta, 0))
    result = get_strategy(name).aggregate(updates, manifest)
    np.testing.assert_allclose(result["bn.running_var"], 0.01)
    np.testing.assert_allclose(result["bn.running_mean"], 0.08, rtol=1e-6)
    weights_only = [TensorSpec("conv.weight", (4, 3))]
    alone = get_strategy(name).aggregate([ClientUpdate(u.client, 10, {"conv.weight": u.delta["conv.weight"]}, 0) for u in updates], weights_only)
    np.testing.assert_array_equal(result["conv.weight"], alone["conv.weight"])
    assert list(result) == [s.name for s in manifest]
