"""benchmarks/privacy.py: the grid it runs and the summary arithmetic (no federation)."""

from __future__ import annotations

import argparse

import pytest
from model_fixtures import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("privacy")


def _args(**kw) -> argparse.Namespace:
    defaults = {
        "epsilons": [1.0, 8.0],
        "local_epsilons": [8.0],
        "seeds": [0, 1],
        "rounds": 15,
        "sites": 10,
        "alpha": 0.5,
        "epochs": 1,
        "large_sites": 100,
        "large_alpha": 2.0,
        "large_epochs": 3,
        "clip": 1.0,
        "codec": "q8,ef|zstd",
        "contrast_codec": "",
        "widths": [8],
        "dataset": "pneumoniamnist",
        "dp_lr": 0.5,
        "dp_batch_size": 64,
    }
    return argparse.Namespace(**(defaults | kw))


def test_grid_covers_every_arm_and_seed(bench) -> None:
    jobs = bench.jobs_for(_args())
    arms = {(j["dp"], j["sites"], j["epsilon"]) for j in jobs}
    assert ("none", 10, None) in arms and ("none", 100, None) in arms and ("record", 100, 8.0) not in arms
    assert {("record", 10, 1.0), ("client-central", 100, 1.0), ("client-local", 100, 8.0)} <= arms
    assert len(jobs) == 2 * len(arms) and all(j["epochs"] == (3 if j["sites"] == 100 else 1) for j in jobs)
    assert not any(j["sites"] == 100 for j in bench.jobs_for(_args(large_sites=0)))
    contrast = [j for j in bench.jobs_for(_args(contrast_codec="topk:0.02|q8")) if j["codec"] == "topk:0.02|q8"]
    assert {(j["dp"], j["sites"], j["epsilon"]) for j in contrast} == {("none", 10, None), ("record", 10, 8.0)} and len(contrast) == 4


def test_summary_deltas_and_acceptance(bench) -> None:
    def run(dp, sites, eps, seed, auc):
        return {
            "dp": dp,
            "sites": sites,
            "epsilon": eps,
            "seed": seed,
            "final_auc": auc,
            "epsilon_spent": eps,
            "noise_multiplier": None,
            "seconds_per_round": 1.0,
        }

    runs = [
        run("none", 10, None, 0, 0.90),
        run("none", 10, None, 1, 0.92),
        run("record", 10, 8.0, 0, 0.88),
        run("record", 10, 8.0, 1, 0.86),
        run("client-central", 10, 8.0, 0, 0.6),
        run("client-central", 10, 8.0, 1, 0.62),
        run("none", 100, None, 0, 0.9),
        run("client-central", 100, 8.0, 0, 0.87),
    ]
    report = bench.summarize(runs, _args())
    rows = {(r["dp"], r["sites"], r["epsilon"]): r for r in report["results"]}
    assert rows[("record", 10, 8.0)]["auc_delta_vs_no_dp"] == pytest.approx(0.87 - 0.91)
    assert rows[("none", 10, None)]["delta"] is None and rows[("record", 10, 8.0)]["delta"] == 1e-5
    assert report["acceptance"]["record_met"] and report["acceptance"]["client_central_within_0.05_at_epsilon_8"] == [100]
    # A contrast codec's rows are measured against their own no-DP baseline, and leave the acceptance alone.
    other = [
        {**r, "codec": "topk", "final_auc": r["final_auc"] - 0.3 * (r["dp"] == "record")} for r in runs if r["sites"] == 10 and r["dp"] != "client-central"
    ]
    report = bench.summarize(runs + other, _args())
    rows = {(r["dp"], r["codec"]): r for r in report["results"] if r["sites"] == 10 and r["epsilon"] in (None, 8.0)}
    assert rows[("record", "topk")]["auc_delta_vs_no_dp"] == pytest.approx(0.87 - 0.3 - 0.91) and report["acceptance"]["record_met"]
