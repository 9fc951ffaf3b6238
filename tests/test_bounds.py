"""The learning bounds (fedge.tasks.bounds) and benchmarks/noniid.py, which reports them beside the
non-IID strategies: a real tiny run end to end, and the summary's arithmetic."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch
from model_fixtures import load_benchmark

from fedge.data import ImageSplits
from fedge.models import ModelConfig
from fedge.tasks import ClassificationTask
from fedge.tasks.bounds import BoundSettings, bounds_report, local_only_aucs, seeded_model


def _task() -> ClassificationTask:
    """Bright images are class 1: learnable in a few epochs by a tiny CNN."""
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, size=(n, 8, 8, 1), dtype=np.uint8) for s, n in (("train", 200), ("val", 20), ("test", 100))}
    labels = {s: (images[s].reshape(len(images[s]), -1).mean(1) > 127).astype(np.int64) for s in images}
    return ClassificationTask(ImageSplits(images=images, labels=labels, name="tiny"))


@pytest.fixture
def one_thread():
    """As agents and the benchmarks train: on a busy 2-core machine, intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_centralized_beats_sites_that_each_see_one_class(one_thread) -> None:
    task = _task()
    make = seeded_model(ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=8, options={"widths": [4, 8]}))
    settings = BoundSettings(sites=2, alpha=0.1, epochs=3, lr=1e-2)  # seed 0: 0/102 and 97/1 samples of each class
    report = bounds_report(task, make, settings, seeds=[0])
    assert set(report["bounds"]) == {"centralized_auc", "local_only_auc"}
    assert report["bounds"]["centralized_auc"] > 0.9
    assert report["bounds"]["centralized_auc"] - report["bounds"]["local_only_auc"] > 0.05
    assert report["bounds_detail"]["local_only_auc_per_seed_and_site"] == [local_only_aucs(task, make, settings, 0)]  # seeded: repeatable


def test_bound_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="alpha"):
        BoundSettings(sites=4, alpha=0, epochs=1)


def test_noniid_summary_and_acceptance() -> None:
    bench = load_benchmark("noniid")
    args = argparse.Namespace(datasets=["breastmnist"], strategies=["fedavg", "fedprox"], alphas=[0.1, 0.5], seeds=[0, 1], sites=4,
                              pneumonia_rounds=2, breast_rounds=2, augment=["breastmnist"], cosine=["breastmnist"], logit_adjust=["breastmnist"],
                              sgd=["breastmnist"], sgd_lr=0.2, epochs=1, lr=1e-3, codec="fp32", pneumonia_widths=[8], breast_widths=[8],
                              calibrate=["breastmnist"])  # fmt: skip
    runs = [{"kind": "centralized", "dataset": "breastmnist", "seed": s, "alpha": None, "strategy": None, "auc": auc} for s, auc in ((0, 0.9), (1, 0.88))]
    runs += [{"kind": "local_only", "dataset": "breastmnist", "seed": 0, "alpha": a, "strategy": None, "auc": auc} for a, auc in ((0.1, 0.6), (0.5, 0.7))]
    runs += [{"kind": "federation", "dataset": "breastmnist", "seed": s, "alpha": a, "strategy": st, "final_auc": auc, "finite": True,
              "uplink_bytes_per_round": 10.0, "rejected": 0, "cpu_seconds": 1.0}
             for a, st, s, auc in [(0.1, "fedavg", 0, 0.70), (0.1, "fedavg", 1, 0.72), (0.1, "fedprox", 0, 0.80), (0.1, "fedprox", 1, 0.82),
                                   (0.5, "fedavg", 0, 0.87), (0.5, "fedavg", 1, 0.89), (0.5, "fedprox", 0, 0.80), (0.5, "fedprox", 1, 0.80)]]  # fmt: skip
    for run in runs:  # the LDA head lifts fedprox at alpha 0.5 past fedavg, and the centralized bound a little
        if run["kind"] == "centralized" or (run["kind"] == "federation" and (run["alpha"] == 0.5 or run["strategy"] == "fedavg")):
            run["calibrated_auc"] = run.get("auc", run.get("final_auc")) + (0.1 if run["strategy"] == "fedprox" else 0.01)
            if run["kind"] == "federation":
                run["calibration_bytes_per_site"] = 400
    report = bench.summarize(runs, args)
    assert report["bounds"]["breastmnist"]["centralized_auc"] == pytest.approx(0.89)
    assert report["bounds"]["breastmnist"]["centralized_calibrated_auc"] == pytest.approx(0.90)
    assert report["bounds"]["breastmnist"]["local_only_auc"] == pytest.approx(0.7)  # at alpha 0.5
    assert report["optimizer"] == {"breastmnist": "sgd"} and report["lr"] == {"breastmnist": 0.2}  # --sgd's datasets at --sgd-lr
    row = next(r for r in report["results"] if r["alpha"] == 0.1 and r["strategy"] == "fedprox")
    assert row["final_auc"] == pytest.approx(0.81) and row["final_auc_std"] == pytest.approx(np.std([0.8, 0.82], ddof=1))
    check = report["acceptance"]["breastmnist"]
    assert check["best_at_alpha_0_5"] == "fedavg" and check["within_0_02_of_centralized"]
    assert check["best_at_alpha_0_1"] == "fedprox" and check["beats_fedavg_beyond_std"] and check["margin"] == pytest.approx(0.1)
    assert check["best_calibrated_at_alpha_0_5"] == "fedprox" and check["its_calibrated_auc"] == pytest.approx(0.9)
    assert check["calibrated_within_0_02_of_centralized"] and check["centralized_calibrated_auc"] == pytest.approx(0.90)
    fedprox = next(r for r in report["results"] if r["alpha"] == 0.5 and r["strategy"] == "fedprox")
    assert fedprox["calibrated_auc_per_seed"] == pytest.approx([0.9, 0.9]) and fedprox["calibration_bytes_per_site"] == 400
    assert "calibrated_auc" not in next(r for r in report["results"] if r["alpha"] == 0.1 and r["strategy"] == "fedprox")  # not measured: not reported
    assert check["best_calibrated_at_alpha_0_1"] == "fedavg" and check["calibrated_margin"] == pytest.approx(0.01)  # against FedAvg without a head
    assert not check["calibrated_beats_fedavg_beyond_std"]  # 0.01 is inside the seeds' spread (0.014)


@pytest.mark.integration
def test_noniid_benchmark_runs_end_to_end(medmnist_root, tmp_path, monkeypatch, one_thread) -> None:
    report = tmp_path / "noniid.json"
    cmd = ["noniid.py", "--report", str(report), "--datasets", "breastmnist", "--seeds", "0", "--breast-rounds", "2",
           "--alphas", "0.5", "--strategies", "fedavg", "fedbn", "--breast-widths", "4", "8", "--workers", "1", "--data-dir", str(medmnist_root)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", cmd)
    load_benchmark("noniid").main()  # one worker: in this process
    data = json.loads(report.read_text())
    assert {(r["dataset"], r["strategy"], r["alpha"]) for r in data["results"]} == {("breastmnist", "fedavg", 0.5), ("breastmnist", "fedbn", 0.5)}
    assert all(set(r) >= {"dataset", "strategy", "alpha", "final_auc", "final_auc_std"} for r in data["results"])
    assert set(data["bounds"]["breastmnist"]) >= {"centralized_auc", "local_only_auc"}
    bytes_per_round = {r["strategy"]: r["uplink_bytes_per_round"] for r in data["results"]}
    assert bytes_per_round["fedbn"] < bytes_per_round["fedavg"]  # normalisation layers stay at the sites
    calibrated = {r["strategy"]: r.get("calibrated_auc") for r in data["results"]}  # --calibrate's default: breastmnist
    assert calibrated["fedbn"] is None and 0.5 < calibrated["fedavg"] <= 1.0  # FedBN has no one global model to calibrate
    assert 0.5 < data["bounds"]["breastmnist"]["centralized_calibrated_auc"] <= 1.0
