"""Property tests: random tensors round-trip; hostile payloads and manifests only ever raise CodecError
and never make the decoder allocate beyond what the bytes and the manifest bound allow."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compression import CodecError, SparseTensor, TensorSpec, UpdateCodec

SPECS = [
    "fp32",
    "fp16|zstd",
    "q8:8",
    "q4|zstd:1",
    "ternary",
    "topk:0.1|fp32",
    "topk:0.3,ef|q8|zstd",
    "gtopk:0.2|q4:16",
    "thresh:0.5|fp16",
    "randk:0.5|ternary|zstd",
]
# Examples per property: 60 in `make test`; `make test-fast` loads the inner-loop profile (15), the
# way Hypothesis's docs suggest a quick local profile beside a thorough CI one.
settings.register_profile("full", max_examples=60)
settings.register_profile("inner-loop", max_examples=15)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "full"))
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)
tensors = shapes.flatmap(lambda s: arrays(np.float32, s, elements=st.floats(-1e4, 1e4, width=32)))
deltas = st.lists(tensors, min_size=1, max_size=4).map(lambda ts: {f"t{i}": t for i, t in enumerate(ts)})


def _payload(spec: str, delta: dict[str, np.ndarray]) -> bytes:
    return UpdateCodec.from_spec(spec).encode(delta, seed=1)


@FAST
@given(delta=deltas, spec=st.sampled_from(SPECS))
def test_random_tensors_roundtrip(delta: dict[str, np.ndarray], spec: str) -> None:
    codec = UpdateCodec.from_spec(spec)
    out = codec.decode(codec.encode(delta), UpdateCodec.manifest(delta))
    for name, x in delta.items():
        y = out[name].to_dense() if isinstance(out[name], SparseTensor) else out[name]
        assert y.shape == x.shape and bool(np.isfinite(y).all())
        if codec.values.lossless:
            kept = y != 0
            np.testing.assert_array_equal(y[kept], x[kept])
        if codec.is_lossless:
            np.testing.assert_array_equal(y, x)


def _decode_or_codec_error(spec: str, payload: bytes, manifest: list[TensorSpec], **kw: int) -> bool:
    try:
        UpdateCodec.from_spec(spec).decode(payload, manifest, **kw)
    except CodecError:
        return False
    return True


@FAST
@given(delta=deltas, spec=st.sampled_from(SPECS), garbage=st.binary(max_size=300))
def test_garbage_payload_only_raises_codec_error(delta: dict[str, np.ndarray], spec: str, garbage: bytes) -> None:
    _decode_or_codec_error(spec, garbage, UpdateCodec.manifest(delta))


@FAST
@given(delta=deltas, spec=st.sampled_from(SPECS), data=st.data())
def test_truncated_payload_is_rejected(delta: dict[str, np.ndarray], spec: str, data: st.DataObject) -> None:
    payload = _payload(spec, delta)
    cut = data.draw(st.integers(0, len(payload) - 1))
    assert not _decode_or_codec_error(spec, payload[:cut], UpdateCodec.manifest(delta))


@FAST
@given(delta=deltas, spec=st.sampled_from(SPECS), extra=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_rejected(delta: dict[str, np.ndarray], spec: str, extra: bytes) -> None:
    assert not _decode_or_codec_error(spec, _payload(spec, delta) + extra, UpdateCodec.manifest(delta))


@FAST
@given(delta=deltas, spec=st.sampled_from(SPECS), data=st.data())
def test_bit_flips_only_raise_codec_error(delta: dict[str, np.ndarray], spec: str, data: st.DataObject) -> None:
    payload = bytearray(_payload(spec, delta))
    for _ in range(data.draw(st.integers(1, 4))):
        bit = data.draw(st.integers(0, 8 * len(payload) - 1))
        payload[bit // 8] ^= 1 << (bit % 8)
    _decode_or_codec_error(spec, bytes(payload), UpdateCodec.manifest(delta))


hostile_entries = st.one_of(
    st.fixed_dictionaries(
        {"name": st.text(max_size=3), "shape": st.lists(st.integers(-5, 1 << 40), max_size=4), "dtype": st.sampled_from(["float32", "int64", "float16", ""])}
    ),
    st.fixed_dictionaries({"name": st.integers(), "shape": st.just([2])}),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.lists(st.integers(), max_size=3),
    st.none(),
    st.fixed_dictionaries({"name": st.just("x"), "shape": st.lists(st.booleans(), min_size=1, max_size=2)}),
)


@FAST
@given(entries=st.lists(hostile_entries, min_size=1, max_size=3), garbage=st.binary(max_size=64), spec=st.sampled_from(SPECS))
def test_hostile_manifests_only_raise_codec_error(entries: list[object], garbage: bytes, spec: str) -> None:
    try:
        manifest = [TensorSpec.from_json(e) for e in entries]
    except CodecError:
        return
    _decode_or_codec_error(spec, garbage, manifest)


@pytest.mark.parametrize("spec", SPECS)
def test_manifest_over_the_output_bound_is_rejected_before_decoding(spec: str) -> None:
    manifest = [TensorSpec("w", (1 << 20, 1 << 10))]  # 4 GiB of float32
    with pytest.raises(CodecError, match="max_output_bytes"):
        UpdateCodec.from_spec(spec).decode(b"\x01", manifest, max_output_bytes=1 << 31)
    with pytest.raises(CodecError, match="repeats"):
        UpdateCodec.from_spec(spec).decode(b"\x01", [TensorSpec("a", (2,)), TensorSpec("a", (2,))])


@settings(max_examples=25, deadline=None)
@given(spec=st.sampled_from(SPECS), garbage=st.binary(min_size=1, max_size=64))
def test_large_manifest_with_tiny_payload_allocates_nothing_big(spec: str, garbage: bytes) -> None:
    manifest = [TensorSpec("w", (25_000_000,))]  # 100 MB if the decoder trusted it
    tracemalloc.start()
    try:
        decoded = _decode_or_codec_error(spec, b"\x01" + garbage, manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not decoded or spec.startswith("thresh")  # nothing over the threshold is a valid thresh update
    assert peak < 2_000_000


def test_zstd_frame_declaring_more_than_the_bound_is_rejected() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))  # ~1.5 KB, declares 50 MB
    with pytest.raises(CodecError, match="declares"):
        UpdateCodec.from_spec("q8|zstd").decode(bomb, [TensorSpec("w", (10,))])


def test_zstd_frame_without_declared_size_stops_at_the_bound() -> None:
    chunks = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = chunks.compress(bytes(5_000_000)) + chunks.flush()
    with pytest.raises(CodecError, match="zstd"):
        UpdateCodec.from_spec("q8|zstd").decode(bomb, [TensorSpec("w", (10,))])


def test_out_of_range_and_unsorted_indices_are_rejected() -> None:
    codec = UpdateCodec.from_spec("topk:0.5")
    manifest = [TensorSpec("w", (4,))]
    values = np.ones(2, "<f4").tobytes()
    # version, kind=1 (delta+varint), count 2, gaps: first index 3, then +1 -> index 5 >= 4
    assert not _decode_or_codec_error("topk:0.5", bytes([1, 1, 2, 3, 1]) + values, manifest)
    # count larger than numel
    assert not _decode_or_codec_error("topk:0.5", bytes([1, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0]), manifest)
    # bitmap with a padding bit set (bit 5 of a 4-element tensor)
    assert not _decode_or_codec_error("topk:0.5", bytes([1, 2, 0b00100001]) + values, manifest)
    # a valid hand-built payload decodes, so the rejections above are about the defects
    out = codec.decode(bytes([1, 1, 2, 0, 1]) + values, manifest)["w"]
    assert isinstance(out, SparseTensor) and out.indices.tolist() == [0, 2]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decoder_rejects_nan_and_inf_values(bad: float) -> None:
    manifest = [TensorSpec("w", (2,))]
    assert not _decode_or_codec_error("fp32", b"\x01\x00" + np.array([1.0, bad], "<f4").tobytes(), manifest)
    assert not _decode_or_codec_error("q8:8", b"\x01\x00" + np.array([bad], "<f4").tobytes() + bytes([1, 1]), manifest)


def test_kind_byte_not_written_by_this_codec_is_rejected() -> None:
    dense_fp32 = b"\x01\x00" + np.ones(2, "<f4").tobytes()
    assert _decode_or_codec_error("fp32", dense_fp32, [TensorSpec("w", (2,))])
    assert not _decode_or_codec_error("topk:0.5|q8", dense_fp32, [TensorSpec("w", (2,))])


@FAST
@given(delta=deltas, spec=st.sampled_from(SPECS), data=st.data())
def test_what_the_encoder_writes_fits_the_bound_the_decoder_enforces(delta: dict[str, np.ndarray], spec: str, data: st.DataObject) -> None:
    """The per-tensor bound is tight: it must still admit every payload our encoder writes, with
    the receiver naming the keep_dense tensors (as fedge does) or not (None)."""
    keep = data.draw(st.lists(st.sampled_from(sorted(delta)), unique=True))
    codec = UpdateCodec.from_spec(spec)
    payload = codec.encode(delta, keep_dense=keep, seed=data.draw(st.integers(0, 99)))
    plain = zstandard.ZstdDecompressor().decompress(payload) if codec.entropy is not None else payload
    manifest = UpdateCodec.manifest(delta)
    for names in (keep, None):
        assert len(plain) <= codec.max_plaintext_bytes(manifest, names)
        out = codec.decode(payload, manifest, keep_dense=names)
        assert sorted(out) == sorted(delta)
    if keep and codec.sparsifier is not None:  # a kept-dense tensor is refused (size or kind) when the receiver says none was kept
        with pytest.raises(CodecError):
            codec.decode(payload, manifest, keep_dense=())
