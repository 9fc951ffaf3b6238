"""The read-only dashboard: an aiohttp app serving one static page and the JSON it polls, run in a
daemon thread beside the round loop.

- `GET /` the page, `GET /static/<file>` its script and style (shipped in this package: no CDN,
  hospital networks block them), `GET /api/state` the JSON (`server.dashboard.state`).
- Only GET/HEAD: nothing on the page changes the federation.
- Bound to 127.0.0.1 unless told otherwise. With a token, `/api/state` needs
  `Authorization: Bearer <token>` (401 without); the page itself holds no data and asks for the token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web

from server.dashboard.options import DEFAULT_HOST, check_token

log = logging.getLogger("fedge.dashboard")

STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("server.dashboard").joinpath("static", name).read_bytes()


def make_app(state: Callable[[], dict[str, Any]], token: str | None = None) -> web.Application:
    """The dashboard app; `state()` returns the JSON document (called for every poll)."""
    if token is not None:
        check_token(token)
    expected = f"Bearer {token}".encode() if token else None
    page = _static("index.html")
    files = {name: (_static(name), kind) for name, kind in STATIC_FILES.items()}

    @web.middleware
    async def headers(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def static(request: web.Request) -> web.Response:
        found = files.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        return web.Response(body=found[0], content_type=found[1], charset="utf-8")

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def api_state(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "a bearer token is required"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        return web.Response(text=json.dumps(state(), allow_nan=False), content_type="application/json")

    app = web.Application(middlewares=[headers], client_max_size=1024)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/favicon.ico", no_content)
    return app


class DashboardServer:
    """Serves the dashboard on HOST:PORT (port 0: a free one) from its own thread and event loop."""

    def __init__(self, state: Callable[[], dict[str, Any]], host: str = DEFAULT_HOST, port: int = 0, token: str | None = None):
        self.app = make_app(state, token)
        self.host = host
        self.port = port
        self.token = token
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> DashboardServer:
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.token:
            log.warning("dashboard on %s without --dashboard-token: anyone who reaches this address sees the federation", self.host)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
        except OSError as exc:
            loop.run_until_complete(runner.cleanup())
            loop.close()
            raise OSError(exc.errno, f"dashboard cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self.port = int(runner.addresses[0][1])
        self._loop, self._runner = loop, runner
        self._thread = threading.Thread(target=loop.run_forever, name="fedge-dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard on %s", self.url)
        return self

    def close(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()
        self._loop = self._runner = self._thread = None

    def __enter__(self) -> DashboardServer:
        return self if self._loop is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
