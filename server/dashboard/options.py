"""The dashboard's options, checked without importing the web framework (`fedge demo` checks them
before anything starts)."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `PORT` (host 127.0.0.1); `[::1]:PORT` for IPv6."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError(f"--dashboard takes HOST:PORT or PORT (e.g. 127.0.0.1:8080), not {text!r}")
    return host, number


def check_token(token: str) -> None:
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError("--dashboard-token must be a non-empty string of printable characters without spaces")
