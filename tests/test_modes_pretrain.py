"""`fedge pretrain` writes a checkpoint that a federation on another dataset starts from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedge.checkpoint import init_from_checkpoint, load_checkpoint
from fedge.cli.main import app
from fedge.modes import get_mode


@pytest.mark.integration
def test_pretrain_writes_a_checkpoint_that_lora_fine_tunes_on_another_dataset(medmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "vit.safetensors"
    args = ["pretrain", "--dataset", "pneumoniamnist", "--data-dir", str(medmnist_root), "--preset", "tiny", "--epochs", "1"]

    result = CliRunner().invoke(app, [*args, "--option", "dim=16", "--out", str(out)])

    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt.config.arch == "vit" and ckpt.config.options == {"preset": "tiny", "dim": 16}
    assert 0.5 < ckpt.meta["test_auc"] <= 1.0
    model, config = init_from_checkpoint(str(out), in_channels=1, num_classes=3, image_size=28)
    torch.testing.assert_close(model.state_dict()["blocks.0.fc1.weight"], ckpt.state["blocks.0.fc1.weight"])
    lora = get_mode("lora").prepare(model, config)
    assert lora(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_pretrain_names_the_flag_when_the_dataset_is_missing(tmp_path: Path) -> None:
    args = ["pretrain", "--dataset", "nosuchmnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 3
    assert "nosuchmnist" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--option", "patch_size"], "'patch_size' is not KEY=VALUE"), (["--arch", "vgg"], "unknown architecture 'vgg'"), (["--lr", "0"], "--lr must be > 0")],
)
def test_pretrain_option_errors_come_before_the_dataset_is_read(args: list[str], message: str, tmp_path: Path, monkeypatch) -> None:
    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the dataset was read before the options were checked")

    monkeypatch.setattr("fedge.data.load_medmnist", never)

    result = CliRunner().invoke(app, ["pretrain", *args, "--out", str(tmp_path / "x.safetensors")])

    assert result.exit_code == 2, result.output
    assert message in result.output
