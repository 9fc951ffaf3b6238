"""The one error type for anything malformed on the wire."""

from typing import Any


class ProtocolError(ValueError):
    """Its message says what was wrong and is safe to log (it never echoes payload bytes)."""


def first_error(exc: Exception) -> str:
    """One line about a validation failure, cheaply: rendering every error of a hostile input
    (hundreds of thousands of bad items) can cost more than the input itself."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        text = str(exc).replace("\n", "; ")
        return text if len(text) <= 300 else text[:297] + "..."
    count = exc.error_count()
    first: dict[str, Any] = dict(exc.errors(include_url=False, include_input=False, include_context=False)[0]) if count else {}
    where = ".".join(map(str, first.get("loc", ()))) or "value"
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"[:300]
