"""The operator's live view of a federation: `serve_dashboard(server, "127.0.0.1:8080")`.

The web app (`server.dashboard.app`, aiohttp) and the JSON (`server.dashboard.state`) are imported
only when a dashboard starts; `server.dashboard.options` checks the options without them.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from server.dashboard.options import check_token, parse_address

if TYPE_CHECKING:
    from server.dashboard.app import DashboardServer
    from server.rounds import RoundServer

__all__ = ["check_token", "parse_address", "serve_dashboard"]


def serve_dashboard(server: RoundServer, address: str, token: str | None = None) -> DashboardServer:
    """Start the dashboard of `server` on `address` (HOST:PORT or PORT); close() it when done."""
    from server.dashboard.app import DashboardServer
    from server.dashboard.state import dashboard_state

    host, port = parse_address(address)
    return DashboardServer(partial(dashboard_state, server), host, port, token).start()
