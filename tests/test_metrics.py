"""Prometheus metrics of the server and the agents, scraped over HTTP and parsed with
prometheus_client's own parser, against the server's history after a 3-round federation (in-process
broker: the numbers, not the transport, are under test here; tests/test_dashboard_browser.py runs
the same endpoints over Mosquitto)."""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from functools import partial

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from edge_client.metrics import AgentMetrics, residual_norm
from fedge.data import dirichlet_split, load_medmnist
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig
from fedge.protocol import Topics
from fedge.tasks import ClassificationTask
from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.rounds import RoundServer

FED = "metrics"
SITES = ("site-1", "site-2")
MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})
CODEC = "topk:0.1,ef|q8|zstd"  # error feedback: the agents' residual norm is not zero


@pytest.fixture(scope="module")
def task(medmnist_root) -> ClassificationTask:
    return ClassificationTask(load_medmnist("breastmnist", medmnist_root))


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def server_config(tmp_path, **options) -> ServerConfig:
    config = {"federation": FED, "broker": "memory://", "model": MODEL, "checkpoint_dir": tmp_path / "ckpt", "rounds": 3,
              "min_clients": 2, "expected_clients": SITES, "round_timeout": 60, "wait_for_clients": 60, "uplink_codec": CODEC}  # fmt: skip
    return ServerConfig(**(config | options))


def run_threads(targets: dict[str, object], timeout: float = 180) -> None:
    errors: list[BaseException] = []

    def guard(target) -> None:
        try:
            target()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(t,), name=name, daemon=True) for name, t in targets.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
        assert not thread.is_alive(), f"{thread.name} did not finish"
    assert not errors, errors


def test_a_scrape_after_three_rounds_matches_the_servers_own_history(task, tmp_path) -> None:
    # Arrange: a 3-round federation of two agents over the in-process broker, every process' metrics served.
    broker = MemoryBroker()
    server = RoundServer(server_config(tmp_path), evaluator=task.evaluate)
    stranger = broker.session("stranger")
    stranger.connect()
    seen_rounds: list[int] = []

    def on_round(record: dict) -> None:  # the caller's own callback keeps working
        seen_rounds.append(record["round"])
        if record["round"] == 1:  # an update chunk for a round that is not open: dropped before it is queued
            stranger.publish(Topics(FED).update_chunk(99, "site-1", 0), b"garbage")

    server.on_round = on_round
    metrics = ServerMetrics(server)
    shards = dirichlet_split(task.splits.labels["train"], 2, 1.0, 0)
    store = tmp_path / "store"
    store.mkdir()
    (store / "images.bin").write_bytes(b"\0" * 12345)
    agents, agent_metrics = {}, {}
    for i, site in enumerate(SITES):
        config = AgentConfig(broker="mqtt://unused:1", site=site, federation=FED, state_dir=tmp_path / site, data_dir=store)
        agents[site] = Agent(config, task, shards[i][:64])
        agent_metrics[site] = AgentMetrics(agents[site])
    stranger.publish(Topics(FED).status("site-9"), b"garbage", retain=True)  # refused as bad-status

    # Act
    with metrics.serve(0) as endpoint, agent_metrics["site-1"].serve(0) as agent_endpoint:
        assert endpoint.host == "127.0.0.1"  # loopback unless the operator says otherwise
        targets = {"server": lambda: server.run(transport=broker.session)}
        for site, agent in agents.items():
            targets[site] = partial(agent.run, transport=agent_metrics[site].transport(broker.session))
        run_threads(targets)
        got = scrape(endpoint.url)
        agent_got = scrape(agent_endpoint.url)

    # Assert: the server's metrics are its own history, counted the Prometheus way.
    history = server.state.history
    assert seen_rounds == [1, 2, 3] and len(history) == 3
    assert got[("fedge_rounds_completed_total", ())] == 3
    assert got[("fedge_rounds_target", ())] == 3
    assert got[("fedge_round_duration_seconds_count", ())] == 3
    assert math.isclose(got[("fedge_round_duration_seconds_sum", ())], sum(r["seconds"] for r in history), rel_tol=1e-9)
    assert got[("fedge_aggregation_seconds_count", ())] == 3
    assert 0 < got[("fedge_aggregation_seconds_sum", ())] < sum(r["seconds"] for r in history)
    assert got[("fedge_updates_received_total", ())] == sum(len(r["clients"]) for r in history) == 6
    assert got[("fedge_uplink_bytes_total", ())] == sum(r["uplink_bytes"] for r in history) > 0
    assert got[("fedge_downlink_bytes_total", ())] == sum(r["downlink_bytes"] for r in history) > 0
    assert got[("fedge_last_auc", ())] == pytest.approx(history[-1]["auc"])
    assert got[("fedge_last_accuracy", ())] == pytest.approx(history[-1]["accuracy"])
    assert got[("fedge_sites_online", ())] == len(server.online)
    assert got[("fedge_federation_info", (("federation", FED), ("run", server.run_id)))] == 1
    assert got[("process_resident_memory_bytes", ())] > 0  # the process' own, in the same private registry
    rejected = {dict(labels)["reason"]: value for (name, labels), value in got.items() if name == "fedge_updates_rejected_total"}
    assert rejected == dict(server.refusals.counts)
    assert rejected["bad-status"] >= 1 and rejected["unexpected-topic"] >= 1
    for site in SITES:
        reported = [m for (rnd, s), m in server.uploads.items() if s == site]
        assert got[("fedge_site_upload_bytes_total", (("site", site),))] == sum(m["upload_bytes"] for m in reported)
        assert got[("fedge_site_last_round", (("site", site),))] == 3

    # ... and the agent's are what it did.
    agent = agents["site-1"]
    assert agent_got[("fedge_agent_rounds_completed_total", ())] == len(agent.rounds_done) == 3
    assert agent_got[("fedge_agent_last_round", ())] == 3
    assert agent_got[("fedge_agent_train_seconds_count", ())] == 3
    assert agent_got[("fedge_agent_upload_seconds_count", ())] == 3
    sent = [m["upload_bytes"] for (rnd, s), m in server.uploads.items() if s == "site-1"]
    assert agent_got[("fedge_agent_upload_bytes_total", ())] == sum(sent)
    assert agent_got[("fedge_agent_residual_norm", ())] == pytest.approx(residual_norm(agent)) and residual_norm(agent) > 0
    assert agent_got[("fedge_agent_store_bytes", ())] == 12345
    assert agent_got[("fedge_agent_state_bytes", ())] > 0


def test_two_servers_in_one_process_keep_their_metrics_apart(tmp_path) -> None:
    first = ServerMetrics(RoundServer(server_config(tmp_path / "a", federation="first")))
    second = ServerMetrics(RoundServer(server_config(tmp_path / "b", federation="second")))
    with first.serve(0) as a, second.serve(0) as b:
        got_a, got_b = scrape(a.url), scrape(b.url)
    assert {dict(k[1]).get("federation") for k in got_a if k[0] == "fedge_federation_info"} == {"first"}
    assert {dict(k[1]).get("federation") for k in got_b if k[0] == "fedge_federation_info"} == {"second"}
    assert got_a[("fedge_rounds_completed_total", ())] == 0 and ("fedge_last_auc", ()) not in got_a  # nothing evaluated yet


def test_a_bad_metrics_port_is_refused_with_the_flag_name(tmp_path) -> None:
    metrics = ServerMetrics(RoundServer(server_config(tmp_path)))
    with pytest.raises(ValueError, match="--metrics-port"):
        metrics.serve(70000)
