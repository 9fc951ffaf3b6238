"""Option errors come before the data is read: a typo must not wait for a dataset (or its download)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedge.cli.bench import bench


def _never(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("data was read before the options were checked")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--iters", "0"], 2, "iters must be >= 1"),
        (["--batch", "1"], 2, "batch must be >= 2"),
        (["--modes", "full,turbo"], 2, "unknown training modes ['turbo']"),
        (["--checkpoint", "/nonexistent/model.safetensors"], 3, "no checkpoint at /nonexistent/model.safetensors"),
        (["--report", "b.png"], 2, "would be overwritten"),
    ],
)
def test_bench_option_errors_come_before_the_data(args: list[str], code: int, message: str, tmp_path: Path, monkeypatch) -> None:
    import typer

    monkeypatch.setattr("device_profiles.bench.load_data", _never)
    app = typer.Typer()
    app.command()(bench)

    result = CliRunner().invoke(app, ["--profile", "cpu-console", "--report", str(tmp_path / "b.json"), *args], env={"COLUMNS": "300"})

    assert result.exit_code == code, result.output
    assert message in result.output
