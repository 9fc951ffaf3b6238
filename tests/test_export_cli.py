"""`fedge export` end to end on a real checkpoint and dataset: exit codes, report file, messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fedge.checkpoint import save_checkpoint
from fedge.cli.export import export

app = typer.Typer()
app.command()(export)
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(trained_cnn, tmp_path_factory):
    model, config, _ = trained_cnn
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", model.state_dict(), config, dataset="pneumoniamnist")


@pytest.mark.integration
def test_export_onnx_writes_report_and_exits_zero(checkpoint, medmnist_root, tmp_path):
    result = runner.invoke(app, [str(checkpoint), "--format", "onnx", "--out", str(tmp_path), "--data-dir", str(medmnist_root)])

    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["format"] == "onnx" and report["precision"] == "fp32" and report["max_abs_diff"] <= 1e-4
    assert report["threads"] == 1 and report["test_samples"] == 624


@pytest.mark.integration
def test_int8_without_calib_calibrates_on_the_train_split(checkpoint, medmnist_root, tmp_path):
    result = runner.invoke(app, [str(checkpoint), "--format", "onnx-int8", "--out", str(tmp_path), "--data-dir", str(medmnist_root)])

    assert result.exit_code == 0, result.output
    assert "train split" in result.output


def test_unusable_calibration_file_exits_with_calibration_code(checkpoint, medmnist_root, tmp_path):
    bad = tmp_path / "nothing.npz"
    np.savez(bad, unrelated=np.zeros(3))
    result = runner.invoke(app, [str(checkpoint), "--format", "onnx-int8", "--out", str(tmp_path / "o"), "--data-dir", str(medmnist_root), "--calib", str(bad)])

    assert result.exit_code == 6, result.output
    assert "calib" in result.output.lower()


def test_precision_the_format_cannot_write_is_a_usage_error(checkpoint, tmp_path):
    result = runner.invoke(app, [str(checkpoint), "--format", "onnx", "--precision", "int8", "--out", str(tmp_path)])

    assert result.exit_code == 2
    assert "onnx exports fp32, fp16, not int8" in result.output


def test_unknown_profile_exits_with_profile_code(checkpoint, tmp_path):
    result = runner.invoke(app, [str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path), "--profile", "no-such-device"])

    assert result.exit_code == 3
    assert "no-such-device" in result.output


def test_missing_checkpoint_is_not_found(tmp_path):
    result = runner.invoke(app, [str(tmp_path / "nope.safetensors"), "--format", "onnx", "--out", str(tmp_path)])

    assert result.exit_code == 3
    assert "no checkpoint" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "1,x"], "--batch-sizes '1,x' must be integers"),
        (["--batch-sizes", "0"], "batch_sizes (0,) must be one or more positive integers"),
        (["--threads", "0"], "threads must be >= 1"),
        (["--precision", "int8"], "onnx exports fp32, fp16, not int8"),
    ],
)
def test_option_errors_come_before_the_checkpoint_and_dataset_are_read(args, message, tmp_path, monkeypatch):
    def never(*_args, **_kwargs):
        raise AssertionError("read before the options were checked")

    monkeypatch.setattr("fedge.checkpoint.load_checkpoint", never)
    monkeypatch.setattr("fedge.data.load_medmnist", never)

    result = runner.invoke(app, [str(tmp_path / "any.safetensors"), "--format", "onnx", "--out", str(tmp_path), *args])

    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.integration
def test_profile_supplies_the_precision_and_names_the_engine_target(checkpoint, medmnist_root, tmp_path):
    npz = medmnist_root / "medmnist" / "pneumoniamnist.npz"
    args = [str(checkpoint), "--format", "tensorrt", "--out", str(tmp_path), "--profile", "jetson-orin-nano-8gb", "--calib", str(npz)]

    result = runner.invoke(app, [*args, "--data-dir", str(medmnist_root)])

    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["precision"] == "int8" and report["profile"] == "jetson-orin-nano-8gb"
    assert "--int8" in (tmp_path / "build_engine.sh").read_text()


def test_calibration_from_an_empty_dicom_store_says_what_to_do(checkpoint, medmnist_root, tmp_path):
    from edge_client.ingest.store import DatasetStore

    store = DatasetStore.create(tmp_path / "store", image_size=28, channels=1)
    args = [str(checkpoint), "--format", "onnx-int8", "--out", str(tmp_path / "out"), "--calib", str(store.root)]

    result = runner.invoke(app, [*args, "--data-dir", str(medmnist_root)])

    assert result.exit_code == 6
    assert "no train-split images" in result.output and "fedge ingest" in result.output
