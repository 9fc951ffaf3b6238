"""Issue 18: each finding of the fuzz campaign, as the input that reproduced it. Every test here
failed on the code before its fix; the handlers' reproducers are the messages of
`benchmarks/fuzzlib/reproducers.py`, which tests/test_fuzz_mosquitto.py also sends over a broker."""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import zstandard
from model_fixtures import BENCHMARKS

from compression import CodecError, TensorSpec, UpdateCodec
from compression.codecs.base import validate_manifest

sys.path.insert(0, str(BENCHMARKS))
from fuzzlib.reproducers import REPRODUCERS  # noqa: E402
from fuzzlib.world import World  # noqa: E402


def _traced(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """(result or the exception raised, CPU seconds of this thread, traced peak bytes). CPU time: the
    bounds are on the work an input costs, which other jobs on the machine do not change."""
    tracemalloc.start()
    started = time.thread_time()
    try:
        out = fn()
    except Exception as exc:  # the caller asserts on what was raised
        out = exc
    finally:
        seconds = time.thread_time() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, seconds, peak


# ---- compression ------------------------------------------------------------------------------------
def test_a_manifest_of_repeated_names_is_refused_in_linear_time() -> None:
    """`names.count(n)` per name: 100,000 entries sharing a name took seconds to refuse."""
    manifest = [TensorSpec("a", (1,))] * 100_000
    out, seconds, _ = _traced(lambda: validate_manifest(manifest, 1 << 31))
    assert isinstance(out, CodecError) and "repeats" in str(out)
    assert seconds < 0.5, seconds


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "w", "shape": [10**5000]},  # more digits than int() renders: a bare ValueError
        {"name": "w", "shape": [1 << 40, 1 << 40]},
        {"name": "x" * 100_000, "shape": [-1]},
        {"name": "w", "shape": [1], "dtype": "[" * 10_000},
    ],
    ids=["5000-digit-dim", "product-over-2^31", "long-name", "long-dtype"],
)
def test_a_hostile_manifest_entry_is_a_short_codec_error(entry: dict) -> None:
    out, seconds, _ = _traced(lambda: TensorSpec.from_json(entry))
    assert type(out) is CodecError, repr(out)
    assert len(str(out)) < 400 and seconds < 0.1


def test_a_manifest_entry_nested_past_the_recursion_limit_is_a_codec_error() -> None:
    """`{data!r}` in the message recursed through a hostile structure."""
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    out, _, _ = _traced(lambda: TensorSpec.from_json({"name": deep, "shape": [1]}))
    assert type(out) is CodecError


def test_a_zstd_frame_larger_than_what_the_codec_writes_is_refused_before_it_is_inflated() -> None:
    """The bound was 6x the manifest for every spec: a sparse codec's 2 MB frame of zeros was
    inflated (and then failed on its version byte); now the frame's declared size is checked
    against what this codec writes for each tensor of this manifest."""
    manifest = [TensorSpec("w", (1 << 20,))]
    codec = UpdateCodec.from_spec("topk:0.01|q8|zstd")
    bomb = zstandard.ZstdCompressor().compress(bytes(2 << 20))
    out, _, peak = _traced(lambda: codec.decode(bomb, manifest, max_output_bytes=4 << 20, keep_dense=()))
    assert isinstance(out, CodecError) and "declares" in str(out), out
    assert peak < 256 << 10, peak
    assert codec.max_plaintext_bytes(manifest, keep_dense=()) < 150_000  # 1% of the entries, q8
    assert codec.max_plaintext_bytes(manifest, keep_dense=("w",)) > 2 << 20  # a BatchNorm statistic may travel as fp16


def test_a_zstd_frame_without_a_declared_size_is_refused_unread() -> None:
    """Our encoder always declares the size; a frame without one made the decoder allocate its whole bound."""
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = cobj.compress(b"\x01\x00" + bytes(8)) + cobj.flush()
    out, _, peak = _traced(lambda: UpdateCodec.from_spec("fp32|zstd").decode(frame, [TensorSpec("w", (1 << 20,))], max_output_bytes=4 << 20))
    assert isinstance(out, CodecError) and "content size" in str(out)
    assert peak < 64 << 10


def test_a_sparse_tensor_with_more_entries_than_its_fraction_keeps_is_refused() -> None:
    """topk:0.01 writes exactly 1% of each tensor: a payload claiming every entry is not ours."""
    manifest = [TensorSpec("w", (1000,)), TensorSpec("v", (1000,))]
    every_entry = b"\x02" + b"\xff" * 125 + b"\x00\x00\x80\x3f" + bytes(125)  # bitmap of all 1000, ternary magnitude and signs
    payload = b"\x01" + every_entry + b"\x01\x00"  # and v: no entries
    codec = UpdateCodec.from_spec("topk:0.01|ternary")
    assert len(payload) <= codec.max_plaintext_bytes(manifest)
    out, _, _ = _traced(lambda: codec.decode(payload, manifest, max_output_bytes=8000))
    assert isinstance(out, CodecError) and "entries" in str(out), out


@pytest.mark.parametrize("spec", ["topk:0.1|fp32", "randk:0.5|ternary|zstd", "gtopk:0.2|q4:16"])
def test_a_fixed_fraction_sparsifier_with_fewer_entries_than_its_fraction_is_refused(spec: str) -> None:
    """topk and randk write exactly their fraction of each tensor, gtopk of all of them together: an
    empty sparse tensor (3 bytes for any shape, densified to the whole tensor by an agent) is not
    theirs (found by the property test)."""
    codec = UpdateCodec.from_spec(spec)
    plain = b"\x01\x01\x00"  # version, delta+varint, no entries
    payload = zstandard.ZstdCompressor().compress(plain) if codec.entropy is not None else plain
    out, _, _ = _traced(lambda: codec.decode(payload, [TensorSpec("w", (25_000_000,))]))
    assert isinstance(out, CodecError) and "entries" in str(out), out


# ---- the envelope header ------------------------------------------------------------------------------
def _envelope(head: bytes) -> bytes:
    return b"FDG1" + len(head).to_bytes(4, "big") + head


@pytest.mark.parametrize(
    "field",
    [
        b'"manifest":[' + b",".join([b"1"] * 520_000) + b"]",  # the 520,000 invalid items
        b'"manifest":[{"name":"w","shape":[' + b",".join([b'"x"'] * 200_000) + b"]}]",  # one entry, a 200,000-item shape
        b'"metrics":{' + b",".join(b'"m%d":"x"' % i for i in range(60_000)) + b"}",  # 60,000 bad metrics
    ],
    ids=["invalid-manifest-items", "long-shape", "many-metrics"],
)
def test_a_header_of_many_invalid_items_is_one_cheap_error(field: bytes) -> None:
    """pydantic collected (and rendered) an error per item: 285 MiB and seconds for a 1 MiB header."""
    from fedge.protocol import ProtocolError, decode_envelope

    head = b'{"kind":"update","federation":"f","round":1,"sender":"s","codec":"fp32",' + field + b"}"
    assert len(head) <= 1 << 20
    out, seconds, peak = _traced(lambda: decode_envelope(_envelope(head)))
    assert isinstance(out, ProtocolError) and "invalid header" in str(out), out
    assert peak < 16 * len(head), f"{peak / 2**20:.1f} MiB traced"
    assert seconds < 1.0, seconds


# ---- the handlers: every reproducer, as the agent and the server receive it --------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("world"))


def _feed(world, side: str, signed: bool, messages: list) -> Counter:
    """The refusals the handler counted for `messages` (the agent then decodes what was announced)."""
    if side == "agent":
        agent = world.agent(signed)
        for msg in messages:
            agent._handle(msg)
        agent._progress()  # outside the handler's safety net: an escape here ends the agent
        return Counter(agent.refusals.counts)
    server, current = world.open_round(signed)
    before = Counter(server.refusals.counts)
    for msg in messages:
        if server._accept(msg.topic) is None:
            server._handle(msg, current)
    return Counter(server.refusals.counts) - before


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("reproducer", REPRODUCERS, ids=lambda r: r.name)
def test_each_reproducer_is_refused_by_its_handler_in_bounded_time_and_memory(world, reproducer, signed: bool) -> None:
    """Refused and counted, never the safety net (`handler-error`); under 5 s of this thread's CPU
    time (the quadratic manifest check took 22 s; CPU time, not wall time, so a loaded machine does
    not fail it) and under 100x the bytes sent in traced memory (1 MiB floor)."""
    messages = reproducer.build(world.attack_target(signed))
    sent = sum(len(m.topic) + len(m.payload) for m in messages)
    refusals, _, peak = _traced(lambda: _feed(world, reproducer.side, signed, messages))
    assert isinstance(refusals, Counter), refusals
    assert sum(refusals.values()) >= 1 and "handler-error" not in refusals, refusals
    assert peak <= max(100 * sent, 1 << 20), f"{peak / 2**20:.1f} MiB traced for {sent} bytes sent"
    started = time.thread_time()
    _feed(world, reproducer.side, signed, messages)
    assert time.thread_time() - started < 5.0


def test_a_model_config_over_the_agents_cap_is_sized_on_the_meta_device_and_refused(world) -> None:
    """The campaign's 14 GB case: the model a global's config names is sized before it is built."""
    reproducer = next(r for r in REPRODUCERS if r.name == "model-config-large")
    agent = world.agent(True)
    for msg in reproducer.build(world.attack_target(True)):
        agent._handle(msg)
    agent._progress()
    assert agent.refusals.counts["bad-global"] == 1 and "max_model_mb=16" in agent.refusals.recent[-1][1]
    assert agent.model is None  # nothing was built
