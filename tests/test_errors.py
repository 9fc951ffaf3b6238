"""One error base, one table of exit codes: documented in `fedge --help`, used by every command."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from fedge.cli.main import app
from fedge.cli.options import exit_code_for, fail, fail_with
from fedge.errors import (
    EXIT_CODES,
    FedgeError,
    NotFoundError,
    ParityError,
    StorageError,
    UsageError,
)


def test_fedge_help_documents_every_exit_code() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    for code, meaning in EXIT_CODES.items():
        assert f"{code}  {meaning}" in result.output


def test_each_error_kind_has_its_own_documented_code() -> None:
    kinds = (UsageError, NotFoundError, ParityError, StorageError)

    assert [k.exit_code for k in kinds] == [2, 3, 7, 8]
    assert all(issubclass(k, FedgeError) and k.exit_code in EXIT_CODES for k in kinds)
    # Builtins keep working for callers that caught them before.
    assert issubclass(UsageError, ValueError) and issubclass(NotFoundError, FileNotFoundError) and issubclass(StorageError, OSError)


@pytest.mark.parametrize(
    ("error", "code"),
    [(ParityError("x"), 7), (FileNotFoundError("x"), 3), (ConnectionRefusedError("x"), 8), (ValueError("x"), 2), (RuntimeError("x"), 1)],
)
def test_caught_errors_map_to_their_code(error: Exception, code: int) -> None:
    assert exit_code_for(error) == code


def test_messages_are_printed_as_is_not_as_rich_markup() -> None:
    cmd = typer.Typer()

    @cmd.command()
    def boom() -> None:
        raise fail_with(NotFoundError("no file at /data/[red]x[/red]/[bold]"))

    result = CliRunner().invoke(cmd, [])

    assert result.exit_code == 3
    assert "error: no file at /data/[red]x[/red]/[bold]" in result.output
    assert isinstance(fail("m"), typer.Exit)
