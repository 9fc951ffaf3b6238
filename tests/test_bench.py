"""`fedge bench` end to end on a real checkpoint: every measured field filled, GPU backends listed as
unavailable with their reason on a CPU host, bytes and projected times consistent with the
profile, the roofline estimate kept apart, and the Markdown and PNG written beside the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from data_fixtures import find_medmnist_root
from typer.testing import CliRunner

from device_profiles import load_profile
from device_profiles.bench import DEFAULT_MODEL, BenchSettings, load_data
from device_profiles.bench_backends import BACKENDS
from device_profiles.bench_train import ModelSource, TrainJob, run_train_job
from fedge.checkpoint import save_checkpoint
from fedge.cli.bench import bench
from fedge.models import ModelConfig, build_model

app = typer.Typer()
app.command()(bench)

CONFIG = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [8, 16]})
INFERENCE_KEYS = {"backend", "batch", "p50_ms", "p95_ms", "p99_ms", "throughput"}
BANDWIDTH_KEYS = {"codec", "uplink_bytes", "downlink_bytes", "uplink_seconds", "downlink_seconds"}
GPU_BACKENDS = ("torch-eager-fp32-cuda", "onnxruntime-fp32-cuda", "tensorrt-fp16")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    folder = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(folder / "cnn.safetensors", model.state_dict(), CONFIG, dataset="breastmnist")


@pytest.fixture(scope="module")
def bench_run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """One `fedge bench` through the CLI (training modes in spawned processes, as shipped)."""
    report = tmp_path_factory.mktemp("bench") / "b.json"
    args = ["--profile", "cpu-console", "--checkpoint", str(checkpoint), "--report", str(report),
            "--iters", "5", "--warmup", "1", "--repeats", "1", "--modes", "full"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text()), report, result.output


@pytest.mark.integration
def test_report_has_the_issue_schema(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    report, _, _ = bench_run

    assert report["profile"] == "cpu-console"
    assert {"profile", "host", "inference", "training", "bandwidth", "estimate"} <= set(report)
    for row in report["inference"]:
        assert INFERENCE_KEYS <= set(row)
        assert isinstance(row["backend"], str) and isinstance(row["batch"], int)
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] and row["throughput"] > 0
    for row in report["training"]:
        assert {"mode", "step_seconds", "peak_mem_mb"} <= set(row)
        assert row["step_seconds"] > 0 and row["peak_mem_mb"] >= 0
    assert BANDWIDTH_KEYS <= set(report["bandwidth"])
    assert report["host"]["threads"] == 1 and report["host"]["torch"] == torch.__version__


@pytest.mark.integration
def test_cpu_backends_are_measured_at_batch_1_and_the_profile_batch(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    report, _, _ = bench_run

    measured = {(r["backend"], r["batch"]) for r in report["inference"]}

    for backend in ("torch-eager-fp32", "onnxruntime-fp32", "onnxruntime-int8"):
        assert {(backend, 1), (backend, 32)} <= measured
    assert all(e["passed"] for e in report["exports"].values()), report["exports"]


@pytest.mark.integration
def test_gpu_backends_are_measured_or_listed_with_a_reason(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    report, _, output = bench_run

    unavailable = {r["backend"]: r["reason"] for r in report["unavailable"] if r["kind"] == "inference"}
    measured = {r["backend"] for r in report["inference"]}

    assert set(GPU_BACKENDS) <= measured | set(unavailable)
    if not torch.cuda.is_available():
        assert not set(GPU_BACKENDS) & measured
        assert "torch.cuda.is_available() False" in unavailable["torch-eager-fp32-cuda"]
        assert "not measured: tensorrt-fp16" in output


@pytest.mark.integration
def test_training_modes_run_in_their_own_process(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    report, _, _ = bench_run

    rows = {r["mode"]: r for r in report["training"]}

    assert set(rows) == {"full"}
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in build_model(CONFIG).parameters())
    assert rows["full"]["memory"] == ("cuda_max_allocated" if torch.cuda.is_available() else "rss_delta")
    assert report["settings"]["isolated_training"] is True


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["lora", "pruned", "qat"])
def test_other_modes_measure_a_step(mode: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(8, 28, 28, 1), dtype=np.uint8)
    job = TrainJob(mode, ModelSource(CONFIG), images, np.arange(8) % 2, "cpu", threads=1, repeats=1)

    row = run_train_job(job, isolate=False)

    assert row["mode"] == mode and row["step_seconds"] > 0
    full = sum(p.numel() for p in build_model(CONFIG).parameters())
    assert 0 < row["trainable_params"] <= full if mode == "qat" else 0 < row["trainable_params"] < full


@pytest.mark.integration
def test_bandwidth_is_a_real_delta_projected_on_the_profile_link(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    report, _, _ = bench_run
    bw = report["bandwidth"]
    link = load_profile("cpu-console").link

    assert bw["codec"] == "topk:0.01,ef|q8|zstd" and bw["training_mode"] == "qat"
    assert 0 < bw["uplink_bytes"] < bw["dense_fp32_bytes"] and bw["local_steps"] >= 1
    assert bw["downlink_bytes"] > bw["uplink_bytes"]  # the full fp32 model goes down
    assert bw["uplink_seconds"] == pytest.approx(bw["uplink_bytes"] * 8 / (link.uplink_mbps * 1e6))
    assert bw["downlink_seconds"] == pytest.approx(bw["downlink_bytes"] * 8 / (link.downlink_mbps * 1e6))


@pytest.mark.integration
def test_estimate_is_labelled_and_names_what_the_profile_lacks(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    report, _, _ = bench_run
    est = report["estimate"]

    assert est["kind"] == "estimate" and est["method"] == "roofline" and "not a measurement" in est["note"]
    assert est["missing"] == ["device.int8_tops", "device.memory_bandwidth_gbs"]  # cpu-console has no sourced peaks
    assert [r["batch"] for r in est["batches"]] == [1, 32] and all(r["latency_ms"] is None for r in est["batches"])
    assert all(r["flops"] > 0 for r in est["batches"])


@pytest.mark.integration
def test_data_comes_from_the_checkpoint_dataset_or_is_called_synthetic(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    report, _, _ = bench_run

    if find_medmnist_root() is not None:
        assert report["data"]["kind"] == "medmnist" and report["data"]["dataset"] == "breastmnist"
    else:
        assert report["data"]["kind"] == "synthetic"
    assert report["model"]["source"].startswith("checkpoint ")


@pytest.mark.integration
def test_markdown_and_png_are_written_beside_the_json(bench_run: tuple[dict[str, Any], Path, str]) -> None:
    _, path, _ = bench_run

    markdown = path.with_suffix(".md").read_text()
    png = path.with_suffix(".png").read_bytes()

    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "| onnxruntime-int8 | 32 |" in markdown
    assert "an estimate, not a measurement" in markdown
    assert "`topk:0.01,ef\\|q8\\|zstd`" in markdown  # pipes escaped inside the table
    assert "## Not measured here" in markdown or torch.cuda.is_available()


def test_synthetic_data_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDGE_DATA_DIR", raising=False)
    monkeypatch.setattr("fedge.data.medmnist.SHARED_DATA", tmp_path / "nowhere")
    settings = BenchSettings(profile=load_profile("cpu-console"), data_dir=tmp_path)

    data = load_data(DEFAULT_MODEL, "pneumoniamnist", settings)

    assert data.source["kind"] == "synthetic" and "pneumoniamnist.npz" in data.source["reason"]
    assert data.train_images.shape[1:] == (28, 28, 1) and data.train_images.dtype == np.uint8
    assert set(np.unique(data.test_labels)) == {0, 1}


def test_default_model_is_the_small_cnn() -> None:
    model = ModelSource(DEFAULT_MODEL).build()

    assert (DEFAULT_MODEL.arch, DEFAULT_MODEL.in_channels, DEFAULT_MODEL.image_size, DEFAULT_MODEL.num_classes) == ("cnn", 1, 28, 2)
    assert math.isclose(sum(p.numel() for p in model.parameters()), 93_154)


def test_every_backend_is_registered_once() -> None:
    assert list(BACKENDS) == ["torch-eager-fp32", "onnxruntime-fp32", "onnxruntime-int8", "torch-eager-fp32-cuda", "onnxruntime-fp32-cuda", "tensorrt"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--profile", "no-such-device"], 3, "no shipped profile named"),
        (["--profile", "cpu-console", "--iters", "0"], 2, "iters must be >= 1"),
        (["--profile", "cpu-console", "--modes", "full,turbo"], 2, "unknown training modes ['turbo']"),
        (["--profile", "cpu-console", "--report", "b.md"], 2, "would be overwritten"),
    ],
)
def test_bad_options_exit_with_their_code(args: list[str], code: int, message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, args + ([] if "--report" in args else ["--report", str(tmp_path / "b.json")]), env={"COLUMNS": "300"})

    assert result.exit_code == code, result.output
    assert message in result.output
