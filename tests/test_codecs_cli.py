"""`fedge compress` on two real checkpoints of the zoo's default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from fedge.checkpoint import save_checkpoint
from fedge.cli.compress import compress
from fedge.models import ModelConfig, build_model

app = typer.Typer()
app.command()(compress)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = ModelConfig()
    state = build_model(config).state_dict()
    trained = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    return save_checkpoint(folder / "a.safetensors", state, config), save_checkpoint(folder / "b.safetensors", trained, config)


def test_compress_reports_bytes_ratio_and_error(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = checkpoints
    out = CliRunner().invoke(app, [str(a), str(b), "--codec", "topk:0.01,ef|q8|zstd:3", "--report", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert "ratio vs fp32" in out.output and "topk:0.01,ef|q8|zstd" in out.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ratio_vs_fp32"] > 20 and report["bytes"] < report["fp32_bytes"]
    assert 0 < report["relative_l2_error"] < 1 and report["max_abs_error"] > 0


def test_compress_lossless_codec_reconstructs_exactly(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = checkpoints
    out = CliRunner().invoke(app, [str(a), str(b), "--codec", "fp32", "--report", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["relative_l2_error"] == 0 and report["max_abs_error"] == 0
    assert report["fp32_bytes"] < report["bytes"] < report["fp32_bytes"] + 100


def test_compress_rejects_mismatched_checkpoints(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = checkpoints
    config = ModelConfig(arch="resnet")
    other = save_checkpoint(tmp_path / "other.safetensors", build_model(config).state_dict(), config)
    out = CliRunner().invoke(app, [str(a), str(other)])
    assert out.exit_code == 2
    assert "same architecture" in out.output


def test_compress_rejects_bad_spec_and_missing_file(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = checkpoints
    out = CliRunner().invoke(app, [str(a), str(b), "--codec", "topk:7"])
    assert out.exit_code == 2 and "(0, 1]" in out.output
    out = CliRunner().invoke(app, [str(a), str(tmp_path / "missing.safetensors")])
    assert out.exit_code == 2 and "no checkpoint" in out.output
