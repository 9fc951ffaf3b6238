"""Real federations over real brokers: the embedded amqtt broker and a Mosquitto process.

Agents run as separate processes (as on real sites); the server runs in-process or as a
`fedge server` process that the resume test kills with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedge.checkpoint import load_checkpoint
from fedge.cli.federation import FederationSettings, run_federation

pytestmark = pytest.mark.integration

FEDGE = [sys.executable, "-m", "fedge.cli.main"]


def test_demo_federation_on_embedded_broker(medmnist_root, tmp_path):
    rounds_seen = []
    report = run_federation(
        FederationSettings(dataset="pneumoniamnist", data_dir=str(medmnist_root), clients=2, rounds=2, workdir=tmp_path / "run"),
        on_round=rounds_seen.append,
        report_path=tmp_path / "report.json",
    )
    assert [r["round"] for r in report["rounds"]] == [1, 2] == [r["round"] for r in rounds_seen]
    assert report["final"]["auc"] > 0.85
    assert report["rejected_updates"] == 0
    # Each round: two dense fp32 updates travelled, each a little over the dense model size.
    for r in report["rounds"]:
        assert 2 * report["dense_update_bytes"] < r["uplink_bytes"] < 2.1 * report["dense_update_bytes"]
        assert r["downlink_bytes"] > 0
    model = load_checkpoint(report["checkpoint"]).build()
    float_tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert sum(t.numel() for t in float_tensors) * 4 == report["dense_update_bytes"]
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_other_dataset_on_mosquitto(medmnist_root, tmp_path, mosquitto_broker):
    host, port = mosquitto_broker
    report = run_federation(
        FederationSettings(
            dataset="breastmnist",
            data_dir=str(medmnist_root),
            clients=2,
            rounds=2,
            broker=f"mqtt://{host}:{port}",
            federation="mosq",
            workdir=tmp_path / "run",
            codec="fp16",
        )
    )
    assert len(report["rounds"]) == 2
    # fp16 halves the payload of the dense fp32 update
    assert report["rounds"][0]["uplink_bytes"] < 1.1 * report["dense_update_bytes"]
    assert report["final"]["auc"] > 0.6  # well above chance after two fp16 rounds (seeded: 0.6775 after one fp32 round)


def test_a_head_calibration_round_on_the_embedded_broker(medmnist_root, tmp_path):
    """Sites in their own processes send their statistics over amqtt; the server refits the final head."""
    from fedge.tasks.calibration import feature_stats

    report = run_federation(
        FederationSettings(dataset="breastmnist", data_dir=str(medmnist_root), clients=2, rounds=2, workdir=tmp_path / "run", calibrate_head=True)
    )
    trained, calibrated = report["rounds"][-2], report["rounds"][-1]
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and calibrated["head_calibration"] is True
    assert report["rejected_updates"] == 0 and report["final"]["auc"] == calibrated["auc"] != trained["auc"]
    model = load_checkpoint(report["checkpoint"]).build()
    per_site = feature_stats(model, np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1), 2).wire_floats * 4
    assert 2 * 0.5 * per_site < calibrated["uplink_bytes"] < 2 * 1.05 * per_site  # two sites' float32 statistics, zstd'd
    assert calibrated["uplink_bytes"] < 0.2 * trained["uplink_bytes"]


def _spawn_federation(root: Path, data: Path, broker: str, federation: str, rounds: int) -> tuple[list[str], list[subprocess.Popen]]:
    server_cmd = FEDGE + [
        "server",
        "--broker",
        broker,
        "--federation",
        federation,
        "--dataset",
        "breastmnist",
        "--data-dir",
        str(data),
        "--rounds",
        str(rounds),
        "--min-clients",
        "2",
        "--clients",
        "site-1,site-2",
        "--checkpoint-dir",
        str(root / "ckpt"),
        "--round-timeout",
        "120",
        "--quiet",
    ]
    agents = []
    for i, site in enumerate(["site-1", "site-2"]):
        cmd = FEDGE + [
            "agent",
            "--broker",
            broker,
            "--site",
            site,
            "--federation",
            federation,
            "--dataset",
            "breastmnist",
            "--data-dir",
            str(data),
            "--shard",
            str(i),
            "--num-shards",
            "2",
            "--alpha",
            "1.0",
            "--state-dir",
            str(root / site),
            "--quiet",
        ]
        agents.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(root / f"{site}.log", "wb")))
    return server_cmd, agents


def finish_round(server: threading.Thread, agents: list[subprocess.Popen]) -> None:
    """Wait for an in-process server's round and its agent processes to end cleanly; kill what is left."""
    try:
        server.join(timeout=240)
        assert not server.is_alive(), "round did not complete"
        for agent in agents:
            assert agent.wait(timeout=60) == 0
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()


def _round_done(ckpt: Path) -> int:
    import json

    try:
        return json.loads((ckpt / "state.json").read_text())["round"]
    except (FileNotFoundError, ValueError):
        return 0


def test_server_killed_mid_federation_resumes_to_the_same_model(medmnist_root, tmp_path, mosquitto_broker):
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    rounds = 4
    finals = []
    for name, kill_after in (("straight", None), ("killed", 2)):
        root = tmp_path / name
        root.mkdir()
        server_cmd, agents = _spawn_federation(root, medmnist_root, broker, f"resume-{name}", rounds)
        log = open(root / "server.log", "wb")
        server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            if kill_after is not None:
                deadline = time.monotonic() + 240
                while _round_done(root / "ckpt") < kill_after:
                    assert server.poll() is None, (root / "server.log").read_text()
                    assert time.monotonic() < deadline, "server made no progress"
                    time.sleep(0.05)
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
                killed_at = _round_done(root / "ckpt")
                assert killed_at < rounds, "the federation finished before the kill; nothing was resumed"
                server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT)
            assert server.wait(timeout=300) == 0, (root / "server.log").read_text()[-3000:]
            for agent in agents:
                assert agent.wait(timeout=60) == 0
        finally:
            for proc in [server, *agents]:
                if proc.poll() is None:
                    proc.kill()
        if kill_after is not None:
            assert "resuming federation" in (root / "server.log").read_text()
        finals.append(load_file(str(root / "ckpt" / "final.safetensors")))
    straight, resumed = finals
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)


def _publish(host: str, port: int, topic: str, payload: bytes) -> None:
    subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-q", "1", "-t", topic, "-s"], input=payload, check=True, timeout=10)


def test_malformed_updates_are_rejected_and_the_round_completes(medmnist_root, tmp_path, mosquitto_broker):
    if subprocess.run(["which", "mosquitto_pub"], capture_output=True).returncode != 0:
        pytest.skip("mosquitto_pub not installed (apt-get install -y mosquitto-clients)")
    from fedge.data import load_medmnist
    from fedge.protocol import (
        EnvelopeHeader,
        StatusMessage,
        Topics,
        encode_envelope,
        sign_record,
        split_chunks,
    )
    from fedge.tasks import ClassificationTask
    from fedge.transport import MqttSession
    from server.config import ServerConfig
    from server.rounds import RoundServer

    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    federation = "hostile"
    topics = Topics(federation)
    model = ClassificationTask(load_medmnist("breastmnist", medmnist_root)).model_config("cnn")
    server = RoundServer(
        ServerConfig(
            federation=federation,
            broker=broker,
            model=model,
            checkpoint_dir=tmp_path / "ckpt",
            rounds=1,
            min_clients=2,
            expected_clients=("site-1", "site-2"),
            round_timeout=120,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while server.session is None or not server.session.connected:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def chunk_of(envelope: bytes) -> bytes:
        return split_chunks(envelope)[0].encode()

    manifest = ({"name": "head.weight", "shape": [2, 128]},)
    good_header = dict(kind="update", federation=federation, round=1, sender="site-1", codec="fp32", manifest=manifest, num_samples=5)
    attacks = {
        "garbage": (topics.update_chunk(1, "site-1", 0), os.urandom(300)),
        "truncated chunk": (topics.update_chunk(1, "site-2", 0), chunk_of(b"x" * 100)[:20]),
        "malformed envelope": (topics.update_chunk(1, "site-1", 0), chunk_of(b"FDG1" + b"\xff" * 50)),
        "wrong federation": (
            topics.update_chunk(1, "site-2", 0),
            chunk_of(encode_envelope(EnvelopeHeader(**(good_header | {"federation": "other", "sender": "site-2"})), b"")),
        ),
        "stale round": (topics.update_chunk(0, "site-1", 0), chunk_of(encode_envelope(EnvelopeHeader(**(good_header | {"round": 0})), b""))),
        "bad topic": (f"fedge/{federation}/round/1/update/site-1/notanumber", b"zzz"),
    }
    # Mark both sites online (retained, as their agents would) so the server opens round 1, then attack the open round.
    for site in ("site-1", "site-2"):
        subprocess.run(
            ["mosquitto_pub", "-h", host, "-p", str(port), "-q", "1", "-r", "-t", topics.status(site), "-s"],
            input=sign_record(StatusMessage(federation=federation, sender=site, state="online"), None),
            check=True,
            timeout=10,
        )
    watcher = MqttSession(broker, "test-watcher", clean_session=True)
    watcher.subscribe(topics.announce(1))
    watcher.connect()
    assert watcher.get(timeout=60) is not None, "round 1 was never announced"
    watcher.close()
    for topic, payload in attacks.values():
        _publish(host, port, topic, payload)
    _, agents = _spawn_federation(tmp_path, medmnist_root, broker, federation, 1)
    finish_round(thread, agents)
    reasons = " | ".join(detail for _, detail in server.refusals.recent)
    assert "bad chunk" in reasons
    assert "header length" in reasons
    assert "wrong federation" in reasons
    assert "round 0 is not open" in reasons  # dropped by topic, before it was queued
    assert server.refusals.counts["bad-topic"] == 1
    assert server.refusals.total >= 6
    assert server.state.round == 1 and server.state.history[0]["clients"] == ["site-1", "site-2"]


def test_broker_killed_mid_federation_recovers(medmnist_root, tmp_path):
    """SIGKILL the (persistent) Mosquitto during a round and restart it: paho reconnects, persistent
    sessions and retained messages come back, a lost update is re-requested, and the federation ends."""
    from brokers import mosquitto_binary

    from fedge.broker import MosquittoProcess, free_port

    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found (apt-get install -y mosquitto)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {tmp_path}/\nautosave_interval 1\n")
    broker_proc = MosquittoProcess(conf, port, tmp_path / "mosquitto.log").__enter__()
    broker = f"mqtt://127.0.0.1:{port}"
    server_cmd, agents = _spawn_federation(tmp_path, medmnist_root, broker, "broker-crash", 3)
    server_cmd[server_cmd.index("--round-timeout") + 1] = "15"
    server = subprocess.Popen(server_cmd, stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while _round_done(tmp_path / "ckpt") < 1:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        broker_proc.kill()
        time.sleep(2)
        broker_proc = MosquittoProcess(conf, port, tmp_path / "mosquitto-restarted.log").__enter__()
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for agent in agents:
            assert agent.wait(timeout=60) == 0
    finally:
        for proc in [server, *agents]:
            if proc.poll() is None:
                proc.kill()
        broker_proc.__exit__()
    assert _round_done(tmp_path / "ckpt") == 3
    assert load_checkpoint(tmp_path / "ckpt" / "final.safetensors").meta["round"] == 3


def test_signed_federation_rejects_a_forged_site(medmnist_root, tmp_path):
    """With --trusted-keys the server counts only sites whose status and updates are signed by a known
    site key; agents verify the server's signatures. A site signing with an unknown key is refused."""
    from fedge.broker import EmbeddedBroker
    from fedge.data import load_medmnist
    from fedge.tasks import ClassificationTask
    from server.config import ServerConfig
    from server.rounds import RoundServer

    keys, trusted = tmp_path / "keys", tmp_path / "trusted"
    for name in ("server", "site-1", "site-2"):
        subprocess.run(FEDGE + ["keys", name, "--out", str(keys)], check=True, capture_output=True)
    subprocess.run(FEDGE + ["keys", "site-2", "--out", str(tmp_path / "rogue")], check=True, capture_output=True)
    trusted.mkdir()
    for name in ("site-1", "site-2"):
        (trusted / f"{name}.pub").write_bytes((keys / f"{name}.pub").read_bytes())
    model = ClassificationTask(load_medmnist("breastmnist", medmnist_root)).model_config("cnn")
    with EmbeddedBroker() as broker:
        server = RoundServer(
            ServerConfig(
                federation="signed",
                broker=broker.url,
                model=model,
                checkpoint_dir=tmp_path / "ckpt",
                rounds=1,
                min_clients=1,
                round_timeout=10,
                trusted_keys=trusted,
                signing_key=keys / "server.key",
                wait_for_clients=120,
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        agents = []
        for i, (site, key) in enumerate([("site-1", keys / "site-1.key"), ("site-2", tmp_path / "rogue" / "site-2.key")]):
            cmd = FEDGE + [
                "agent",
                "--broker",
                broker.url,
                "--site",
                site,
                "--federation",
                "signed",
                "--dataset",
                "breastmnist",
                "--data-dir",
                str(medmnist_root),
                "--shard",
                str(i),
                "--num-shards",
                "2",
                "--state-dir",
                str(tmp_path / site),
                "--signing-key",
                str(key),
                "--server-key",
                str(keys / "server.pub"),
                "--quiet",
            ]
            agents.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            thread.join(timeout=240)
            assert not thread.is_alive(), "round did not complete"
        finally:
            for agent in agents:
                agent.wait(timeout=60) if agent.poll() is None else None
                if agent.poll() is None:
                    agent.kill()
    # The rogue's signed status does not verify, so it is never online, never selected, and its update is never read.
    assert server.state.history[0]["clients"] == ["site-1"]
    assert any(kind == "bad-signature" and "status of site-2: bad signature" in detail for kind, detail in server.refusals.recent)


def test_sparse_updates_with_error_feedback_and_delta_downlink(medmnist_root, tmp_path):
    """Top-k + error feedback up, quantized deltas down: bytes shrink, residuals persist on both sides
    and a restarted server picks its downlink residual back up."""
    from server.config import ServerConfig
    from server.rounds import RoundServer

    settings = FederationSettings(
        dataset="breastmnist",
        data_dir=str(medmnist_root),
        clients=2,
        rounds=2,
        workdir=tmp_path / "run",
        codec="topk:0.05,ef|q8|zstd",
        downlink_codec="q8,ef|zstd",
        federation="sparse",
    )
    report = run_federation(settings)
    dense = report["dense_update_bytes"]
    for r in report["rounds"]:
        assert r["uplink_bytes"] < 2 * dense / 10  # two sites, each well over 10x below dense fp32
    assert report["rounds"][1]["downlink_bytes"] < report["rounds"][0]["downlink_bytes"] / 2  # delta vs full
    for site in ("site-1", "site-2"):
        assert (tmp_path / "run" / "agents" / site / "residual.safetensors").stat().st_size > 0
    ckpt = load_checkpoint(report["checkpoint"])
    restarted = RoundServer(
        ServerConfig(
            federation="sparse",
            broker="mqtt://127.0.0.1:1",
            model=ckpt.config,
            checkpoint_dir=tmp_path / "run" / "checkpoints",
            rounds=2,
            downlink_codec="q8|zstd",
        )
    )
    assert restarted.state.round == 2
    assert len(restarted.downlink_residual) > 0


def test_emulated_link_upload_time_matches_the_projection(medmnist_root, tmp_path):
    """`--emulate-link` paces each agent to its profile's uplink: the measured upload of a dense update
    lands within 15% of bytes / bandwidth (the issue's acceptance bound)."""
    import yaml

    from device_profiles.loader import resolve_profile_path

    profile = yaml.safe_load(resolve_profile_path("cpu-console").read_text())
    profile["device"]["name"] = "slow-site"
    profile["link"].update(uplink_mbps=4.0, downlink_mbps=None)
    path = tmp_path / "slow-site.yaml"
    path.write_text(yaml.safe_dump(profile))
    report = run_federation(
        FederationSettings(
            dataset="breastmnist",
            data_dir=str(medmnist_root),
            clients=2,
            rounds=1,
            workdir=tmp_path / "run",
            federation="slowlink",
            emulate_link=str(path),
        )
    )
    transfer = report["uplink_transfer"]
    assert transfer["updates"] == 2 and transfer["projected_seconds"] > 0.5
    assert 0.85 <= transfer["measured_over_projected"] <= 1.15, transfer
