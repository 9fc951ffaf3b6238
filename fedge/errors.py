"""The errors a user can act on, each carrying the exit code the CLI leaves with.

One base, so a command (and `fedge server`, which runs for days) can turn every known failure
into a one-line message and its documented code, while a bug still shows its traceback (exit 1).
`EXIT_CODES` is the table `fedge --help` prints; a new code is added there and nowhere else.
Subclasses also derive from the builtin they refine (ValueError, FileNotFoundError, OSError), so
callers that caught the builtin keep working.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error (a bug: report it with the traceback)",
    2: "usage: a bad option or argument, or an input fedge cannot use (wrong model, newer schema, malformed)",
    3: "not found: a checkpoint, dataset, device profile or other named input does not exist",
    4: "export failed, or the artifact fails its structural check",
    5: "the model uses an operator the export target cannot express",
    6: "int8 calibration data missing or unusable",
    7: "parity check failed: the artifact is written but does not match the PyTorch model",
    8: "I/O error: disk full, no permission, broker or network unreachable",
}


class FedgeError(Exception):
    """Base of fedge's own errors; the message says what happened and what to do."""

    exit_code: ClassVar[int] = 1


class UsageError(FedgeError, ValueError):
    """A bad option, argument or setting, or an input that exists but cannot be used."""

    exit_code = 2


class NotFoundError(FedgeError, FileNotFoundError):
    """A named input (checkpoint, dataset, profile, key) does not exist."""

    exit_code = 3


class SchemaVersionError(UsageError):
    """A file written by a newer fedge (or an unknown layout): refuse it rather than misread it."""


class ParityError(FedgeError):
    """An exported artifact disagrees with the PyTorch model it came from."""

    exit_code = 7


class StorageError(FedgeError, OSError):
    """Disk, permission or network trouble: nothing wrong with the input, retry once it is fixed."""

    exit_code = 8


def check_schema_version(found: object, supported: int, what: str) -> None:
    """Refuse a record whose `schema_version` is newer than (or not) one this fedge reads."""
    if found != supported:
        newer = isinstance(found, int) and found > supported
        hint = "upgrade fedge to read it" if newer else "it was not written by fedge, or is damaged"
        raise SchemaVersionError(f"{what} has schema_version {found!r}; this fedge reads {supported}: {hint}")
