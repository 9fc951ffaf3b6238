"""The operator's live view of a federation: `serve_dashboard(server, "127.0.0.1:8080")`."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from server.dashboard.app import DashboardServer, make_app, parse_address
from server.dashboard.state import dashboard_state

if TYPE_CHECKING:
    from server.rounds import RoundServer

__all__ = ["DashboardServer", "dashboard_state", "make_app", "parse_address", "serve_dashboard"]


def serve_dashboard(server: RoundServer, address: str, token: str | None = None) -> DashboardServer:
    """Start the dashboard of `server` on `address` (HOST:PORT or PORT); close() it when done."""
    host, port = parse_address(address)
    return DashboardServer(partial(dashboard_state, server), host, port, token).start()
