"""The dashboard's HTTP side: the JSON after a real (in-process) federation, the bearer token, the
loopback default, read-only routes, and a page that loads nothing from outside. The page itself is
driven in a real browser by tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from importlib import resources

import pytest

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge.data import dirichlet_split, load_medmnist
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig
from fedge.protocol import Topics
from fedge.tasks import ClassificationTask
from server.config import ServerConfig
from server.dashboard import parse_address, serve_dashboard
from server.dashboard.app import DashboardServer
from server.dashboard.state import dashboard_state
from server.rounds import RoundServer

FED = "dash"
SITES = ("site-1", "site-2")
MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})
TOKEN = "s3cret-token-for-tests"


def get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def finished(medmnist_root, tmp_path_factory) -> RoundServer:
    """A 2-round, 2-site federation over the in-process broker, with one refused input."""
    tmp = tmp_path_factory.mktemp("dashboard")
    task = ClassificationTask(load_medmnist("breastmnist", medmnist_root))
    broker = MemoryBroker()
    config = ServerConfig(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp / "ckpt", rounds=2, min_clients=2,
                          expected_clients=SITES, round_timeout=60, wait_for_clients=60)  # fmt: skip
    server = RoundServer(config, evaluator=task.evaluate)
    stranger = broker.session("stranger")
    stranger.connect()
    stranger.publish(Topics(FED).status("site-9"), b"garbage", retain=True)
    shards = dirichlet_split(task.splits.labels["train"], 2, 1.0, 0)
    threads = [threading.Thread(target=partial(server.run, transport=broker.session), daemon=True)]
    for i, site in enumerate(SITES):
        agent = Agent(AgentConfig(broker="mqtt://unused:1", site=site, federation=FED, state_dir=tmp / site), task, shards[i][:64])
        threads.append(threading.Thread(target=partial(agent.run, transport=broker.session), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
        assert not thread.is_alive()
    assert server.state.round == 2
    return server


def test_the_state_is_the_servers_own_history_and_nothing_else(finished) -> None:
    state = dashboard_state(finished)
    history = finished.state.history
    assert state["federation"] == FED and state["run"] == finished.run_id
    assert state["status"] == "finished" and (state["round"], state["rounds"]) == (2, 2)
    assert [s["site"] for s in state["sites"]] == list(SITES)
    for site in state["sites"]:
        assert site["last_round"] == 2 and site["updates"] == 2
        assert site["upload_bytes"] == sum(m["upload_bytes"] for (r, s), m in finished.uploads.items() if s == site["site"]) > 0
    assert [r["round"] for r in state["history"]] == [1, 2]
    assert state["history"][1]["cumulative_uplink_bytes"] == sum(r["uplink_bytes"] for r in history)
    assert state["history"][1]["auc"] == history[1]["auc"]
    assert state["rejections"]["by_reason"] == dict(finished.refusals.counts) and state["rejections"]["by_reason"]["bad-status"] >= 1
    assert {c["file"] for c in state["checkpoints"]} == {"round_0001.safetensors", "round_0002.safetensors", "final.safetensors"}
    # Never weights, payloads or image data: allow-listed keys, short values.
    assert set(state) == {"schema_version", "generated_at", "federation", "run", "status", "round", "rounds", "sites", "history",
                          "totals", "rejections", "checkpoints"}  # fmt: skip
    for record in state["history"]:
        assert set(record) <= {"round", "clients", "uplink_bytes", "downlink_bytes", "rejected", "seconds", "auc", "accuracy", "cumulative_uplink_bytes"}
    assert len(json.dumps(state)) < 8000
    assert all(len(r["detail"]) <= 200 for r in state["rejections"]["recent"])


def test_the_token_guards_the_data_and_the_page_loads_nothing_from_outside(finished) -> None:
    with serve_dashboard(finished, "127.0.0.1:0", token=TOKEN) as dashboard:
        api = dashboard.url + "api/state"
        assert get(api)[0] == 401
        assert get(api, token="wrong")[0] == 401
        status, headers, body = get(api, token=TOKEN)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["run"] == finished.run_id
        status, headers, _ = get(dashboard.url)  # the page holds no data: it asks for the token
        assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
        for name in ("dashboard.js", "dashboard.css"):
            assert get(dashboard.url + "static/" + name)[0] == 200
        assert get(dashboard.url + "static/../app.py")[0] == 404
        assert get(api, token=TOKEN, method="POST")[0] == 405  # read-only
    static = resources.files("server.dashboard").joinpath("static")
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = static.joinpath(name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+", text))
        assert urls <= {"http://www.w3.org"}, f"{name} names {urls}: the page must not load from outside (SVG namespace only)"


def test_the_dashboard_listens_on_loopback_unless_told_otherwise(finished) -> None:
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address(":8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    for bad in ("host:port", "127.0.0.1:70000", ""):
        with pytest.raises(ValueError, match="--dashboard"):
            parse_address(bad)
    with pytest.raises(ValueError, match="--dashboard-token"):
        DashboardServer(dict, token="two words")
    with serve_dashboard(finished, "0") as dashboard:
        assert dashboard.host == "127.0.0.1" and dashboard.port > 0
        with socket.create_connection(("127.0.0.1", dashboard.port), timeout=5):
            pass
        port = dashboard.port
    time.sleep(0.1)
    with pytest.raises(OSError):  # closed: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_operator_options_are_checked_before_anything_starts() -> None:
    from server.watch import WatchSettings

    assert not WatchSettings().any
    assert WatchSettings(dashboard="127.0.0.1:8080", dashboard_token=TOKEN, metrics_port=9100).any
    for options, flag in (
        ({"metrics_port": 70000}, "--metrics-port"),
        ({"dashboard": "somewhere"}, "--dashboard"),
        ({"dashboard_token": TOKEN}, "--dashboard-token"),  # a token without a dashboard
        ({"dashboard": "8080", "dashboard_token": "two words"}, "--dashboard-token"),
    ):
        with pytest.raises(ValueError, match=flag):
            WatchSettings(**options)
