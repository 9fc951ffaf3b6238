"""The one error type for anything malformed on the wire."""


class ProtocolError(ValueError):
    """Its message says what was wrong and is safe to log (it never echoes payload bytes)."""
