"""Update codecs: spec parsing, round trips of every registered stage, error feedback, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from compression import STAGES, CodecError, CodecSpecError, ErrorFeedback, SparseTensor, TensorSpec, UpdateCodec

VALUE_STAGES = sorted(n for n, c in STAGES.items() if c.kind == "values")
SPARSIFIERS = sorted(n for n, c in STAGES.items() if c.kind == "sparsifier")


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.02, size=(16, 8, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.02, size=(16,)).astype(np.float32),
        "fc.weight": rng.normal(0, 0.05, size=(10, 300)).astype(np.float32),
        "bn.running_mean": rng.normal(0, 0.1, size=(16,)).astype(np.float32),
    }


def _dense(x: np.ndarray | SparseTensor) -> np.ndarray:
    return x.to_dense() if isinstance(x, SparseTensor) else x


def _roundtrip(spec: str, delta: dict[str, np.ndarray], **kw: object) -> dict[str, np.ndarray]:
    codec = UpdateCodec.from_spec(spec)
    out = codec.decode(codec.encode(delta, **kw), UpdateCodec.manifest(delta))
    assert list(out) == list(delta)
    return {k: _dense(v) for k, v in out.items()}


def _within_block_bound(x: np.ndarray, y: np.ndarray, levels: int, block: int) -> bool:
    """Stochastic rounding moves each value by less than one step of its block's scale."""
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    pad = (-flat_x.size) % block
    step = np.repeat(np.abs(np.pad(flat_x, (0, pad))).reshape(-1, block).max(axis=1) / levels, block)[: flat_x.size]
    return bool(np.all(np.abs(flat_x - flat_y) <= step * (1 + 1e-5) + 1e-12))


# Each registered value coder's accuracy contract (a new coder must add its own).
VALUE_BOUNDS = {
    "fp32": lambda x, y: np.array_equal(x, y),
    "fp16": lambda x, y: np.allclose(x, y, rtol=1e-3, atol=1e-7),
    "q8": lambda x, y: _within_block_bound(x, y, 127, 256),
    "q4": lambda x, y: _within_block_bound(x, y, 7, 256),
    "ternary": lambda x, y: x.size == 0 or np.allclose(np.abs(y), np.abs(x).mean(), rtol=1e-5) and np.array_equal(np.sign(y), np.where(x < 0, -1, 1)),
}


def test_every_value_stage_has_an_accuracy_contract() -> None:
    assert sorted(VALUE_BOUNDS) == VALUE_STAGES


@pytest.mark.parametrize("name", VALUE_STAGES)
def test_dense_value_coder_roundtrip(name: str) -> None:
    delta = _delta()
    out = _roundtrip(name, delta)
    for key, x in delta.items():
        assert out[key].shape == x.shape and out[key].dtype == np.float32
        assert VALUE_BOUNDS[name](x, out[key]), key


@pytest.mark.parametrize("name", VALUE_STAGES)
@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
def test_sparse_combo_roundtrip_keeps_only_selected(name: str, sparsifier: str) -> None:
    arg = "1e-2" if sparsifier == "thresh" else "0.1"
    delta = _delta(1)
    codec = UpdateCodec.from_spec(f"{sparsifier}:{arg}|{name}|zstd")
    decoded = codec.decode(codec.encode(delta, seed=3), UpdateCodec.manifest(delta))
    for key, x in delta.items():
        sparse = decoded[key]
        assert isinstance(sparse, SparseTensor) and sparse.shape == x.shape
        kept = x.reshape(-1)[sparse.indices]
        assert VALUE_BOUNDS[name](kept, sparse.values), key
        assert np.count_nonzero(sparse.to_dense()) <= sparse.indices.size


def test_topk_keeps_the_largest_per_tensor() -> None:
    delta = _delta()
    out = UpdateCodec.from_spec("topk:0.05").decode(UpdateCodec.from_spec("topk:0.05").encode(delta), UpdateCodec.manifest(delta))
    for key, x in delta.items():
        sparse = out[key]
        assert isinstance(sparse, SparseTensor)
        assert sparse.indices.size == max(1, round(0.05 * x.size))
        mag = np.abs(x.reshape(-1))
        dropped = np.delete(mag, sparse.indices)
        assert dropped.size == 0 or mag[sparse.indices].min() >= dropped.max()
        np.testing.assert_array_equal(sparse.values, x.reshape(-1)[sparse.indices])


def test_gtopk_uses_one_global_threshold() -> None:
    delta = {"big": np.full(100, 10.0, np.float32), "small": np.full(100, 0.1, np.float32)}
    delta["small"][:3] = 50.0
    out = _roundtrip("gtopk:0.1", delta)
    assert np.count_nonzero(out["big"]) + np.count_nonzero(out["small"]) == 20
    assert np.count_nonzero(out["small"]) == 3  # topk would have sent 10 of the small tensor


def test_thresh_keeps_entries_at_or_above_value() -> None:
    x = np.array([0.5, -2.0, 1.0, 0.99, -1.0], np.float32)
    out = _roundtrip("thresh:1.0", {"w": x})
    np.testing.assert_array_equal(out["w"], [0, -2.0, 1.0, 0, -1.0])


def test_randk_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    codec = UpdateCodec.from_spec("randk:0.05|q8|zstd")
    delta = _delta()
    assert codec.encode(delta, seed=7) == codec.encode(delta, seed=7)
    assert codec.encode(delta, seed=7) != codec.encode(delta, seed=8)


def test_keep_dense_travels_dense_fp16() -> None:
    delta = _delta()
    out = UpdateCodec.from_spec("topk:0.01|q4").decode(
        UpdateCodec.from_spec("topk:0.01|q4").encode(delta, keep_dense=["bn.running_mean"]), UpdateCodec.manifest(delta)
    )
    assert isinstance(out["bn.running_mean"], np.ndarray)
    np.testing.assert_allclose(out["bn.running_mean"], delta["bn.running_mean"], rtol=1e-3, atol=1e-6)
    assert isinstance(out["fc.weight"], SparseTensor)


def test_keep_dense_keeps_small_statistics_beside_large_ones() -> None:
    """A running_var holds values of very different sizes: one block scale (int8) would round the
    small ones to zero or below, and a negative variance turns BatchNorm's output into NaN."""
    var = np.array([5.0, 1e-3, 2e-4, 3e-5], dtype=np.float32)
    out = _roundtrip("topk:0.01,ef|ternary|zstd", {"bn.running_var": var}, keep_dense=["bn.running_var"])
    np.testing.assert_allclose(out["bn.running_var"], var, rtol=1e-3)


def test_keep_dense_stays_exact_under_lossless_values() -> None:
    delta = _delta()
    out = _roundtrip("topk:0.01|fp32", delta, keep_dense=["bn.running_mean"])
    np.testing.assert_array_equal(out["bn.running_mean"], delta["bn.running_mean"])


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("topk:0.01,ef|q8|zstd:3", "topk:0.01,ef|q8|zstd"),
        ("topk:1e-2|q8:128|zstd:9", "topk:0.01|q8:128|zstd:9"),
        ("topk:0.01|zstd", "topk:0.01|fp32|zstd"),
        ("q8,ef", "q8,ef"),
        (" gtopk:0.001 , ef | ternary ", "gtopk:0.001,ef|ternary"),
        ("fp32", "fp32"),
    ],
)
def test_spec_canonical_form_roundtrips(spec: str, canonical: str) -> None:
    codec = UpdateCodec.from_spec(spec)
    assert codec.spec == canonical
    assert UpdateCodec.from_spec(codec.spec) == codec


def test_spec_properties() -> None:
    assert UpdateCodec.from_spec("fp32|zstd").is_lossless
    assert not UpdateCodec.from_spec("topk:1.0").is_lossless
    assert UpdateCodec.from_spec("topk:0.01,ef|q8").uses_error_feedback
    assert not UpdateCodec.from_spec("topk:0.01|q8").uses_error_feedback


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty codec spec"),
        ("top:0.1", "valid stages: fp16, fp32, gtopk"),
        ("topk", "needs a fraction"),
        ("topk:0", "(0, 1]"),
        ("topk:nan", "(0, 1]"),
        ("topk:0.1|randk:0.1", "at most one of each"),
        ("q8|topk:0.1", "out of place"),
        ("zstd|q8", "out of place"),
        ("fp32,ef", "lossless"),
        ("topk:0.1,ef|q8,ef", "twice"),
        ("topk:0.1,fast", "valid flags"),
        ("q8:3", "8..65536"),
        ("zstd:23", "1..22"),
        ("fp16:2", "takes no argument"),
        ("thresh:-1", "positive magnitude"),
        ("q8||zstd", "empty stage"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(CodecSpecError) as info:
        UpdateCodec.from_spec(spec)
    assert needle in str(info.value)
    assert isinstance(info.value, CodecError) and isinstance(info.value, ValueError)


def test_encode_rejects_nan_and_inf_with_a_clear_error() -> None:
    for bad in (np.nan, np.inf):
        delta = _delta()
        delta["conv.bias"][3] = bad
        with pytest.raises(CodecError, match="conv.bias.*lower the learning rate"):
            UpdateCodec.from_spec("q8").encode(delta)


def test_fp16_overflow_is_a_clear_error() -> None:
    with pytest.raises(CodecError, match="fp16 range"):
        UpdateCodec.from_spec("fp16").encode({"w": np.array([1e6], np.float32)})


def test_encode_rejects_unknown_keep_dense_and_non_float() -> None:
    with pytest.raises(CodecError, match="keep_dense"):
        UpdateCodec.from_spec("q8").encode(_delta(), keep_dense=["nope"])
    with pytest.raises(CodecError, match="floating numpy array"):
        UpdateCodec.from_spec("q8").encode({"steps": np.array([3], np.int64)})


def test_manifest_follows_dict_order_and_dtypes() -> None:
    delta = {"b": np.zeros((2, 3), np.float16), "a": np.zeros(4, np.float64)}
    assert UpdateCodec.manifest(delta) == [TensorSpec("b", (2, 3), "float16"), TensorSpec("a", (4,), "float64")]
    assert [TensorSpec.from_json(s.to_json()) for s in UpdateCodec.manifest(delta)] == UpdateCodec.manifest(delta)


def _accumulated_error(spec: str, rounds: int = 30) -> float:
    """Distance between what the server summed and what the agent meant to send, after `rounds`."""
    codec, residual = UpdateCodec.from_spec(spec), ErrorFeedback()
    delta = _delta(5)
    manifest = UpdateCodec.manifest(delta)
    sent = {k: np.zeros_like(v) for k, v in delta.items()}
    for r in range(rounds):
        for k, v in codec.decode(codec.encode(delta, residual=residual, seed=r), manifest).items():
            sent[k] += _dense(v)
    return float(np.sqrt(sum(np.sum((sent[k] - rounds * delta[k]) ** 2) for k in delta)))


@pytest.mark.parametrize("spec", ["topk:0.05,ef|q8", "randk:0.1,ef|fp16", "gtopk:0.05,ef|ternary", "q4,ef"])
def test_error_feedback_reduces_accumulated_error(spec: str) -> None:
    without = spec.replace(",ef", "")
    assert _accumulated_error(spec) < 0.5 * _accumulated_error(without)


def test_error_feedback_feeds_back_quantization_error() -> None:
    residual = ErrorFeedback()
    delta = _delta()
    UpdateCodec.from_spec("q4,ef").encode(delta, residual=residual)
    out = _roundtrip("q4", delta)
    for key, x in delta.items():
        np.testing.assert_allclose(residual.state_dict()[key], x - out[key], atol=1e-6)


def test_residual_ignored_without_ef_flag() -> None:
    residual = ErrorFeedback()
    UpdateCodec.from_spec("topk:0.01|q8").encode(_delta(), residual=residual)
    assert len(residual) == 0


def test_error_feedback_survives_serialization() -> None:
    codec = UpdateCodec.from_spec("topk:0.02,ef|q8|zstd")
    live = ErrorFeedback()
    codec.encode(_delta(0), residual=live, seed=1)
    restored = ErrorFeedback().load_bytes(live.to_bytes())
    assert sorted(restored.state_dict()) == sorted(live.state_dict())
    assert codec.encode(_delta(1), residual=restored, seed=2) == codec.encode(_delta(1), residual=live, seed=2)


def test_error_feedback_load_errors_are_clear() -> None:
    with pytest.raises(CodecError, match="delete it"):
        ErrorFeedback().load_bytes(b"not safetensors", "junk")


def test_error_feedback_shape_change_is_a_clear_error() -> None:
    residual = ErrorFeedback()
    residual.load_state_dict({"w": np.zeros(3, np.float32)})
    with pytest.raises(CodecError, match="fresh ErrorFeedback"):
        UpdateCodec.from_spec("topk:0.5,ef").encode({"w": np.ones(4, np.float32)}, residual=residual)


@pytest.mark.parametrize("numel", [1, 7, 1000, 100_000])
@pytest.mark.parametrize("fraction", [0.001, 0.3, 1.0])
def test_index_coding_roundtrips_both_layouts(numel: int, fraction: float) -> None:
    x = np.random.default_rng(numel).normal(size=numel).astype(np.float32)
    out = _roundtrip(f"topk:{fraction}", {"w": x})
    k = max(1, round(fraction * numel))
    assert np.count_nonzero(out["w"]) == k
    assert np.array_equal(out["w"] != 0, np.isin(np.arange(numel), np.argsort(-np.abs(x))[:k]))


def test_sparse_payload_is_far_smaller_than_fp32() -> None:
    x = {"w": np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)}
    fp32 = len(UpdateCodec.from_spec("fp32").encode(x))
    assert fp32 / len(UpdateCodec.from_spec("topk:0.01|q8|zstd").encode(x)) > 150
    assert fp32 / len(UpdateCodec.from_spec("topk:0.001|ternary|zstd").encode(x)) > 1000
