"""benchmarks/codec_bench.py: the summary arithmetic, and every benchmark script starts (no federation)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
from model_fixtures import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("codec_bench")


@pytest.mark.integration
@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_starts(script: str):
    """Run as a script, benchmarks/ is sys.path[0]: a file there named like a package (compression.py)
    shadows it, which is why the codec benchmark is codec_bench.py."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--report" in out.stdout


def test_summary_ratios_means_and_ef_pairs(bench):
    args = argparse.Namespace(
        specs=["topk:0.01,ef|q8|zstd", "topk:0.01|q8|zstd"],
        clients=4,
        seeds=[0, 1],
        rounds=2,
        alpha=1.0,
        epochs=1,
        lr=1e-3,
        dataset="pneumoniamnist",
        downlink_codec=None,
        repeats=1,
        timing_round=1,
    )

    def run(codec, seed, auc, up):
        return {"codec": codec, "seed": seed, "final_auc": auc, "uplink_bytes_per_round": up, "downlink_bytes_per_round": 0.0}

    runs = [
        run("fp32", 0, 0.90, 400_000),
        run("fp32", 1, 0.92, 400_000),
        run("topk:0.01,ef|q8|zstd", 0, 0.905, 3_000),
        run("topk:0.01,ef|q8|zstd", 1, 0.925, 5_000),
        run("topk:0.01|q8|zstd", 0, 0.80, 4_000),
        run("topk:0.01|q8|zstd", 1, 0.82, 4_000),
    ]
    timing = {
        s: {"encode_ms": 1.0, "decode_ms": 0.5, "payload_bytes_real_update": 100_018 if s == "fp32" else 900, "relative_l2_error": 0.0}
        for s in ["fp32", *args.specs]
    }
    report = bench.summarize(args, runs, timing, 400_000, 448)
    rows = {r["codec"]: r for r in report["results"]}
    ef = rows["topk:0.01,ef|q8|zstd"]
    assert ef["ratio_vs_fp32"] == pytest.approx(100.0)
    assert ef["final_auc"] == pytest.approx(0.915) and ef["auc_delta_vs_fp32"] == pytest.approx(0.005)
    assert ef["final_auc_std"] == pytest.approx(np.std([0.905, 0.925], ddof=1))
    assert ef["meets_acceptance"] and not rows["topk:0.01|q8|zstd"]["meets_acceptance"]
    assert report["acceptance"]["passing_specs"] == ["topk:0.01,ef|q8|zstd"]
    (pair,) = report["ef_comparison"]
    assert pair["without_ef"] == "topk:0.01|q8|zstd" and pair["auc_gain_from_ef"] == pytest.approx(0.105)
    assert report["envelope_overhead_bytes_per_update"] == pytest.approx(100_000 - 100_018)


def test_time_codec_on_a_model_delta(bench):
    rng = np.random.default_rng(0)
    delta = {"conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 1e-3, "bn.running_mean": rng.standard_normal(16).astype(np.float32)}
    t = bench.time_codec("topk:0.01,ef|q8|zstd", delta, ["bn.running_mean"], repeats=2)
    assert t["encode_ms"] > 0 and t["decode_ms"] > 0 and t["payload_bytes_real_update"] > 32  # fp16 BN stats travel
    assert 0 < t["relative_l2_error"] < 1
