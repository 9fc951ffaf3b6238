"""benchmarks/modes.py: the report arithmetic, the acceptance verdicts, the script's import path and
one footprint measured in-process on a tiny checkpoint (no federation)."""

from __future__ import annotations

import argparse
import queue
import subprocess
import sys
from pathlib import Path

import pytest
from model_fixtures import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "modes.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("modes")


@pytest.mark.integration
def test_script_runs_from_its_folder_without_shadowing_packages():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--report" in out.stdout and "--codec" in out.stdout


def test_lr_flag_takes_one_value_or_per_mode_overrides(bench):
    assert bench.parse_lr("2e-3") == dict.fromkeys(bench.MODES, 2e-3)
    lr = bench.parse_lr("lora=5e-3")
    assert lr["lora"] == 5e-3 and lr["full"] == bench.DEFAULT_LR["full"]
    with pytest.raises(argparse.ArgumentTypeError, match="nosuch"):
        bench.parse_lr("nosuch=1")


def test_mode_options_reach_get_mode(bench):
    from fedge.modes import get_mode

    args = bench.build_parser().parse_args(["--report", "x.json", "--lora-r", "8", "--lora-alpha", "16", "--prune-ratio", "0.25"])
    assert get_mode("lora", **bench.mode_options("lora", args)).r == 8
    assert get_mode("pruned", **bench.mode_options("pruned", args)).ratio == 0.25
    assert bench.mode_options("full", args) == {} and bench.mode_options("qat", args) == {}
    assert get_mode("lora", **bench.mode_options("lora", args)).targets is None  # the cnn's default: every conv but the head
    vit = bench.build_parser().parse_args(["--report", "x.json", "--arch", "vit"])
    assert get_mode("lora", **bench.mode_options("lora", vit)).targets == ("qkv",)  # the vit's: attention only
    more = bench.build_parser().parse_args(["--report", "x.json", "--lora-targets", "all", "--lora-options", "train_norms=true,freeze_a=true"])
    lora = get_mode("lora", **bench.mode_options("lora", more))
    assert (lora.targets, lora.train_norms, lora.freeze_a) == (None, True, True)
    with pytest.raises(SystemExit):  # argparse's usage error, not a typer exception's traceback
        bench.build_parser().parse_args(["--report", "x.json", "--lora-options", "train_norms"])


def _run(auc: float, uplinks: list[int]) -> dict:
    return {"final": {"auc": auc}, "rounds": [{"auc": auc - 0.1, "uplink_bytes": u} for u in uplinks], "seconds": 1.0}


def _cost(trainable: int, mem: float, prune: dict | None = None) -> dict:
    return {"trainable_params": trainable, "model_params": 6_000_000 if prune is None else prune["params_after"],
            "peak_train_mem_mb": mem, "step_seconds": 0.5, "prune": prune}  # fmt: skip


def test_summary_ratio_is_dense_full_model_over_one_sites_update(bench):
    row = bench.summarise("lora", [_run(0.80, [40_000, 40_000]), _run(0.84, [48_000, 40_000])], _cost(100_000, 500.0), 4, 24_000_000)

    assert row["uplink_bytes_per_round"] == 42_000
    assert row["uplink_bytes_per_update"] == 10_500
    assert row["ratio_vs_full_fp32"] == pytest.approx(24_000_000 / 10_500)
    assert row["final_auc"] == pytest.approx(0.82) and row["final_auc_std"] == pytest.approx(0.028284, abs=1e-5)
    assert row["trainable_fraction"] == pytest.approx(100_000 / 6_000_000)
    assert row["mean_auc_by_round"] == pytest.approx([0.72, 0.72])
    assert set(row) >= {"mode", "trainable_params", "uplink_bytes_per_round", "ratio_vs_full_fp32", "final_auc",
                        "final_auc_std", "peak_train_mem_mb", "step_seconds"}  # fmt: skip


def test_acceptance_verdicts(bench):
    prune = {"params_before": 6_000_000, "params_after": 1_500_000, "macs_before": 100, "macs_after": 25}
    full = bench.summarise("full", [_run(0.80, [4_000_000])], _cost(6_000_000, 700.0), 4, 24_000_000)
    lora = bench.summarise("lora", [_run(0.79, [40_000])], _cost(100_000, 500.0), 4, 24_000_000)
    pruned = bench.summarise("pruned", [_run(0.75, [1_000_000])], _cost(1_500_000, 400.0, prune), 4, 24_000_000)

    verdict = bench.acceptance([full, lora, pruned], 6_000_000)

    assert verdict["lora_trains_at_most_2pct"] and verdict["lora_ratio_at_least_1000x"]
    assert verdict["lora_ratio_vs_full_fp32"] == pytest.approx(2400)
    assert verdict["lora_auc_within_0.02_of_full"] and verdict["lora_peak_mem_below_full"]
    assert verdict["pruned_mac_reduction"] == 4.0
    assert not verdict["pruned_auc_within_0.02_of_full"]
    assert verdict["all_hold"] is False
    assert bench.acceptance([full], 4_000_000) == {"backbone_params": 4_000_000, "backbone_at_least_5m": False, "all_hold": False}


TINY = {"vit": {"preset": "tiny"}, "cnn": {"widths": [16, 32], "norm": "group"}}


@pytest.mark.parametrize(("arch", "mode"), [("vit", "lora"), ("vit", "pruned"), ("cnn", "lora"), ("cnn", "pruned")])
def test_footprint_of_a_tiny_pretrained_backbone(bench, arch, mode, medmnist_root: Path, tmp_path: Path):
    import torch

    from fedge.checkpoint import save_checkpoint
    from fedge.models import ModelConfig, build_model

    config = ModelConfig(arch=arch, in_channels=1, num_classes=2, image_size=28, options=TINY[arch])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", build_model(config).state_dict(), config)
    argv = ["--report", str(tmp_path / "r.json"), "--data-dir", str(medmnist_root), "--step-repeats", "1", "--arch", arch, "--dataset", "breastmnist"]
    args = bench.build_parser().parse_args(argv)
    out: queue.Queue = queue.Queue()

    threads = torch.get_num_threads()
    try:
        bench.footprint(mode, args, ckpt, out)
    finally:
        torch.set_num_threads(threads)  # footprint pins the agent's thread count

    cost = out.get_nowait()
    assert cost["mode"] == mode and cost["peak_train_mem_mb"] > 0 and cost["step_seconds"] > 0
    assert 0 < cost["trainable_params"] <= cost["model_params"]
    if mode == "lora":
        assert cost["trainable_params"] < cost["model_params"] and cost["prune"] is None
    else:
        assert cost["prune"]["params_after"] < cost["prune"]["params_before"]
        assert cost["prune"]["macs_after"] < cost["prune"]["macs_before"]
    if (arch, mode) == ("cnn", "lora"):  # adapters (A, B) on both convs and the head; GroupNorm has no statistics to send
        r, head = bench.DEFAULT_LORA_R, 32 * 2 + 2
        assert cost["trained_tensors"] == 2 * 2 + 2
        assert cost["trainable_params"] == r * (1 * 9 + 16) + r * (16 * 9 + 32) + head


@pytest.mark.integration
def test_bounds_fine_tune_the_pretrained_backbone_on_the_federations_split(bench, medmnist_root: Path, tmp_path: Path):
    import torch

    from fedge.checkpoint import save_checkpoint
    from fedge.models import ModelConfig, build_model

    config = ModelConfig(arch="vit", in_channels=1, num_classes=2, image_size=28, options={"preset": "tiny"})
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", build_model(config).state_dict(), config)
    args = bench.build_parser().parse_args(["--report", str(tmp_path / "r.json"), "--data-dir", str(medmnist_root), "--seeds", "1", "--arch", "vit", "--dataset", "breastmnist",
                                            "--rounds", "1", "--epochs", "1", "--clients", "2"])  # fmt: skip
    threads = torch.get_num_threads()
    try:
        out = bench.learning_bounds(args, ckpt)
    finally:
        torch.set_num_threads(threads)
    assert set(out["bounds"]) == {"centralized_auc", "local_only_auc"} and all(0 <= v <= 1 for v in out["bounds"].values())
    assert out["bounds_detail"]["sites"] == 2 and len(out["bounds_detail"]["local_only_auc_per_seed_and_site"][0]) == 2


def test_bounds_acceptance_compares_full_with_centralized_and_the_published_figure(bench):
    full = bench.summarise("full", [_run(0.95, [4_000_000])], _cost(6_000_000, 700.0), 4, 24_000_000)

    ok = bench.bounds_acceptance([full], {"centralized_auc": 0.96, "local_only_auc": 0.90}, "pneumoniamnist")
    low = bench.bounds_acceptance([full], {"centralized_auc": 0.98, "local_only_auc": 0.90}, "pneumoniamnist")
    short = bench.bounds_acceptance([], {"centralized_auc": 0.85, "local_only_auc": 0.80}, "breastmnist")

    assert ok["centralized_reaches_published"] and ok["full_within_0.02_of_centralized"]
    assert ok["full_minus_centralized"] == pytest.approx(-0.01)
    assert not low["full_within_0.02_of_centralized"]
    assert short == {"published_resnet18_28_auc": 0.901, "centralized_reaches_published": False}
    both = bench.acceptance([full], 6_000_000, {"centralized_auc": 0.98, "local_only_auc": 0.90}, "pneumoniamnist")
    assert both["full_within_0.02_of_centralized"] is False and both["all_hold"] is False  # issue 13's checks count in all_hold
