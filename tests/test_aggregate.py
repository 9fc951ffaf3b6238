"""SparseAccumulator: the weighted mean of sparse and dense updates, without densifying sparse ones."""

from __future__ import annotations

import numpy as np
import pytest

from compression import CodecError, SparseAccumulator, SparseTensor, UpdateCodec


def _updates(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(42)
    return [{"w": rng.normal(size=(20, 30)).astype(np.float32), "b": rng.normal(size=(30,)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("spec", ["topk:0.05|q8|zstd", "gtopk:0.1|fp32", "q4", "fp16", "randk:0.2|ternary"])
def test_accumulator_equals_dense_weighted_mean(spec: str) -> None:
    codec, updates, weights = UpdateCodec.from_spec(spec), _updates(6), [1.0, 5.0, 2.5, 10.0, 3.0, 7.0]
    manifest = UpdateCodec.manifest(updates[0])
    decoded = [codec.decode(codec.encode(u, seed=i), manifest) for i, u in enumerate(updates)]
    acc = SparseAccumulator(manifest)
    for d, w in zip(decoded, weights):
        acc.add(d, w)
    result = acc.result()
    for name in ("w", "b"):
        dense = [d[name].to_dense() if isinstance(d[name], SparseTensor) else d[name] for d in decoded]
        expected = sum(w * x.astype(np.float64) for w, x in zip(weights, dense)) / sum(weights)
        assert result[name].shape == expected.shape and result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)
    assert acc.total_weight == sum(weights)


def test_accumulator_mixes_sparse_and_dense_updates() -> None:
    manifest = UpdateCodec.manifest({"w": np.zeros(5, np.float32)})
    acc = SparseAccumulator(manifest)
    acc.add({"w": SparseTensor((5,), np.array([1, 4], np.int64), np.array([2.0, -4.0], np.float32))}, 1.0)
    acc.add({"w": np.full(5, 1.0, np.float32)}, 3.0)
    np.testing.assert_allclose(acc.result()["w"], [0.75, 1.25, 0.75, 0.75, -0.25])


def test_accumulator_rejects_mismatches_with_clear_errors() -> None:
    acc = SparseAccumulator(UpdateCodec.manifest({"w": np.zeros((2, 3), np.float32)}))
    with pytest.raises(CodecError, match="nothing to aggregate"):
        acc.result()
    with pytest.raises(CodecError, match="missing \\['w'\\]"):
        acc.add({"v": np.zeros((2, 3), np.float32)}, 1.0)
    with pytest.raises(CodecError, match="shape"):
        acc.add({"w": np.zeros(6, np.float32)}, 1.0)
    with pytest.raises(CodecError, match="shape"):
        acc.add({"w": SparseTensor((6,), np.array([0], np.int64), np.ones(1, np.float32))}, 1.0)
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(CodecError, match="positive finite"):
            acc.add({"w": np.zeros((2, 3), np.float32)}, weight)


def test_sparse_tensor_validates_its_indices() -> None:
    with pytest.raises(CodecError, match="strictly increasing"):
        SparseTensor((4,), np.array([2, 1], np.int64), np.ones(2, np.float32))
    with pytest.raises(CodecError, match="strictly increasing"):
        SparseTensor((4,), np.array([4], np.int64), np.ones(1, np.float32))
    with pytest.raises(CodecError, match="int64"):
        SparseTensor((4,), np.array([1], np.int32), np.ones(1, np.float32))
