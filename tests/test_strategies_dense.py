"""benchmarks/aggregation.py: each robust strategy's dense numpy equivalent (the baseline it is timed
against) gives the same aggregate as the sparse strategy."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import load_benchmark

from compression import TensorSpec, UpdateCodec


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("aggregation")


@pytest.mark.parametrize("clients", [7, 12])
def test_robust_rows_match_their_dense_equivalents(bench, clients: int) -> None:
    manifest = [TensorSpec("conv", (8, 4, 3, 3)), TensorSpec("bn.running_var", (8,)), TensorSpec("bias", (8,)), TensorSpec("fc", (10, 8))]
    codec, rng = UpdateCodec.from_spec(bench.UPDATE_SPEC.replace("0.01", "0.1")), np.random.default_rng(0)
    updates = [codec.decode(codec.encode(bench.random_delta(manifest, rng), seed=i), manifest) for i in range(clients)]
    rows = bench.robust_rows("tiny", manifest, updates, ["median", "trimmed_mean", "multikrum", "clipping", "centered_clipping"], 1)
    assert [r["strategy"] for r in rows] == ["median", "trimmed_mean", "multikrum", "clipping", "centered_clipping"]
    for row in rows:
        assert row["clients"] == clients and row["params"] == sum(s.numel for s in manifest)
        assert row["max_abs_diff"] < 1e-8, row
