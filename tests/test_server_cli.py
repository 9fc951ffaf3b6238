"""`fedge server` ends on a known error with one line and its documented exit code, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedge.checkpoint import save_checkpoint
from fedge.cli.server import server
from fedge.models import ModelConfig, build_model

CONFIG = ModelConfig("cnn", 1, 2, 28, {"widths": [4, 8]})


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FEDGE_DATA_DIR", raising=False)  # the model config comes from --init: no dataset
    init = save_checkpoint(tmp_path / "init.safetensors", build_model(CONFIG).state_dict(), CONFIG)
    app = typer.Typer()
    app.command()(server)

    def run(*args: str) -> tuple[int, list[str]]:
        result = CliRunner().invoke(app, ["--init", str(init), "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet", *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, [line for line in result.output.splitlines() if line.strip()]

    return run


def test_a_missing_init_checkpoint_is_not_found(invoke, tmp_path: Path) -> None:
    code, lines = invoke("--init", str(tmp_path / "absent.safetensors"))

    assert code == 3 and len(lines) == 1 and lines[0].startswith("error: no checkpoint at")


def test_a_bad_codec_is_a_usage_error_before_any_broker_starts(invoke) -> None:
    code, lines = invoke("--codec", "topk:0.1|q9")

    assert code == 2 and len(lines) == 1 and "unknown stage 'q9'" in lines[0]


def test_a_calibration_round_under_a_robust_strategy_is_a_usage_error_before_any_broker_starts(invoke) -> None:
    code, lines = invoke("--calibrate-head", "--strategy", "median")

    assert code == 2 and len(lines) == 1 and "--calibrate-head with strategy 'median'" in lines[0] and "one lying site" in lines[0]


@pytest.mark.integration  # the session retries the broker for 30 s before it gives up
def test_an_unreachable_broker_is_an_io_error(invoke) -> None:
    code, lines = invoke("--broker", "mqtt://127.0.0.1:9")

    assert code == 8 and len(lines) == 1 and "cannot reach MQTT broker at 127.0.0.1:9" in lines[0]
