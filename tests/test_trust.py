"""Issue 11's acceptance on a plain Mosquitto (no ACLs, signatures on): a stranger on the broker
forges announcements, control messages and globals, replays a signed update and a signed
`finished` recorded in an earlier run of the same federation, sends a huge forged update, floods the
server from a dozen fake sites and sends a deeply nested header. Everything is refused with a logged
reason, the server and agents keep running, the server's memory stays bounded, and the federation
ends with exactly the model of an undisturbed run with the same seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from brokers import Recorder
from safetensors.numpy import load_file

from fedge.cli.federation import signing_keys
from fedge.protocol import (
    EnvelopeHeader,
    RoundAnnouncement,
    StatusMessage,
    Topics,
    encode_envelope,
    open_record,
    sign_record,
    split_chunks,
)
from fedge.protocol.signing import Signer
from fedge.transport import MqttSession

pytestmark = pytest.mark.mosquitto

FEDGE = [sys.executable, "-m", "fedge.cli.main"]
FED = "trust"
SITES = ("site-1", "site-2")


class PeakRss(threading.Thread):
    def __init__(self, pid: int):
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)


def _run(root: Path, broker: str, data: Path, keys: dict[str, Path], attack=None) -> dict:
    """One seeded 2-round federation: `fedge server` and two `fedge agent` processes. The sites are
    first marked online with their own keys so round 1 opens before their agents start; `attack`
    then runs against the open round, before the agents exist."""
    root.mkdir()
    topics = Topics(FED)
    recorder = Recorder(broker, f"recorder-{root.name}", FED)
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(FEDGE + [
        "server", "--broker", broker, "--federation", FED, "--dataset", "breastmnist", "--data-dir", str(data),
        "--rounds", "2", "--min-clients", "2", "--clients", ",".join(SITES), "--checkpoint-dir", str(root / "ckpt"),
        "--round-timeout", "120", "--trusted-keys", str(keys["trusted"]), "--signing-key", str(keys["server"]),
    ], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    rss = PeakRss(server.pid)
    rss.start()
    agents: list[subprocess.Popen] = []
    try:
        for site in SITES:
            online = sign_record(StatusMessage(federation=FED, sender=site, state="online"), Signer.load(keys[site]))
            subprocess.run(["mosquitto_pub", "-L", f"{broker}/{topics.status(site)}", "-q", "1", "-r", "-s"], input=online, check=True, timeout=10)
        announcement = recorder.wait_for(topics.announce(1))
        if attack is not None:
            attack(open_record(announcement, RoundAnnouncement, None, federation=FED), root)
        for i, site in enumerate(SITES):
            agents.append(subprocess.Popen(FEDGE + [
                "agent", "--broker", broker, "--site", site, "--federation", FED, "--dataset", "breastmnist",
                "--data-dir", str(data), "--shard", str(i), "--num-shards", "2", "--alpha", "1.0",
                "--state-dir", str(root / site), "--signing-key", str(keys[site]), "--server-key", str(keys["server.pub"]),
            ], stdout=subprocess.DEVNULL, stderr=open(root / f"{site}.log", "wb")))  # fmt: skip
        assert server.wait(timeout=300) == 0, (root / "server.log").read_text()[-3000:]
        for site, agent in zip(SITES, agents):
            assert agent.wait(timeout=60) == 0, (root / f"{site}.log").read_text()[-3000:]
    finally:
        rss.stop.set()
        for proc in [server, *agents]:
            if proc.poll() is None:
                proc.kill()
        recorder.close()
    return {
        "final": load_file(str(root / "ckpt" / "final.safetensors")),
        "messages": recorder.messages,
        "peak_rss": rss.peak,
        "server_log": (root / "server.log").read_text(),
        "agent_logs": {site: (root / f"{site}.log").read_text() for site in SITES},
    }


def test_a_stranger_on_the_broker_cannot_steer_stop_poison_exhaust_or_replay(medmnist_root, tmp_path, mosquitto_broker):
    if subprocess.run(["which", "mosquitto_pub"], capture_output=True).returncode != 0:
        pytest.skip("mosquitto_pub not installed (apt-get install -y mosquitto-clients)")
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    keys = signing_keys(tmp_path / "keys", SITES)
    topics = Topics(FED)
    undisturbed = _run(tmp_path / "undisturbed", broker, medmnist_root, keys)
    earlier = undisturbed["messages"]
    # What the attacker recorded from the earlier run: site-1's signed round-1 update, the signed
    # `finished`, the signed round-2 announcement and the signed round-1 global.
    replay_update = [p for t, p in earlier if t.startswith(topics.update_chunk(1, "site-1", 0)[:-1]) and p]
    replay_finished = [p for t, p in earlier if t == topics.control and p][-1]
    replay_announce = [p for t, p in earlier if t == topics.announce(2) and p][0]
    replay_global = [(t, p) for t, p in earlier if t.startswith(topics.root + "/round/1/global/") and p]
    assert replay_update and replay_global

    def attack(ann: RoundAnnouncement, root: Path) -> None:
        mallory = MqttSession(broker, "mallory", clean_session=True).connect()
        try:
            # Finding 4: replay the earlier run's signed update of site-1 into this run's round 1.
            for i, payload in enumerate(replay_update):
                mallory.publish(topics.update_chunk(1, "site-1", i), payload)
            # Finding 2: finite 3e38 values and 1e9 samples in site-2's name (unsigned, the right run and model).
            header = EnvelopeHeader(kind="update", federation=FED, round=1, sender="site-2", codec="fp32", num_samples=10**9,
                                    run=ann.run, model_sha256=ann.model_sha256)  # fmt: skip
            forged = encode_envelope(header, b"\x7f\x7f\xff\xff" * 100_000)
            for chunk in split_chunks(forged):
                mallory.publish(topics.update_chunk(1, "site-2", chunk.index), chunk.encode())
            # Finding 3: a dozen fake sites, 6 MiB each, and a deeply nested header in site-2's name.
            junk = split_chunks(b"\x00" * (6 << 20))
            for fake in range(12):
                for chunk in junk:
                    mallory.publish(topics.update_chunk(1, f"fake-{fake}", chunk.index), chunk.encode())
            nested = b"[" * 200_000
            mallory.publish(topics.update_chunk(1, "site-2", 0), split_chunks(b"FDG1" + len(nested).to_bytes(4, "big") + nested)[0].encode())
            # Finding 1: forged and replayed control and announcements, retained so every agent meets them at start.
            mallory.publish(topics.control, b"1", retain=True)
            mallory.publish(topics.control, b'{"command": "finished"}', retain=True)
            mallory.publish(topics.announce(999999999), sign_record(ann.model_copy(update={"round": 999999999}), None), retain=True)
            mallory.publish(
                topics.announce(7),
                sign_record(ann.model_copy(update={"round": 7, "train": ann.train.model_copy(update={"lr": 5.0})}), Signer.generate()),
                retain=True,
            )
            mallory.publish(topics.announce(2), replay_announce, retain=True)
            for topic, payload in replay_global:  # a signed global of another run, under this run's round 2
                mallory.publish(topic.replace("/round/1/", "/round/2/"), payload, retain=True)
            mallory.publish(topics.control, replay_finished, retain=True)
        finally:
            mallory.close()

    attacked = _run(tmp_path / "attacked", broker, medmnist_root, keys, attack)

    log = attacked["server_log"]
    assert "refused (wrong-run)" in log  # the replayed update
    assert "refused (bad-signature)" in log  # the forged 3e38 update
    assert "refused (unexpected-topic)" in log and "fake-0" in log  # the flood, dropped by topic
    summary = json.loads(log.split("refused inputs this run, by kind: ")[1].splitlines()[0])
    assert summary["unexpected-topic"] >= 12 * 24, summary
    assert "refused (bad-envelope)" in log and "invalid header" in log  # the nested header
    assert "Traceback" not in log
    for site, agent_log in attacked["agent_logs"].items():
        assert "refused (bad-record)" in agent_log, site  # `1` and the unsigned {"command": "finished"}
        assert "refused (bad-signature)" in agent_log, site  # round 999999999 and the stranger's lr=5 announcement
        assert "refused (wrong-run)" in agent_log, site  # the earlier run's announcement and `finished`
        assert "Traceback" not in agent_log, site
    # Same model as the undisturbed run, bit for bit.
    assert attacked["final"].keys() == undisturbed["final"].keys()
    for key, value in undisturbed["final"].items():
        np.testing.assert_array_equal(attacked["final"][key], value, err_msg=key)
    # 72 MiB of flood left the server's peak memory within 2x of the undisturbed run's.
    assert attacked["peak_rss"] < 2 * undisturbed["peak_rss"], (attacked["peak_rss"], undisturbed["peak_rss"])
    print(f"server peak RSS: undisturbed {undisturbed['peak_rss'] / 2**20:.0f} MiB, attacked {attacked['peak_rss'] / 2**20:.0f} MiB")


def test_demo_secure_runs_over_mosquitto_with_certificates_acls_and_signatures(medmnist_root, tmp_path):
    """`fedge demo --secure`: provisioned CA, kits and broker config; every client connects over mTLS
    as its certificate identity; the federation finishes with no refusals."""
    from brokers import mosquitto_binary

    from fedge.cli.federation import FederationSettings, run_federation

    if mosquitto_binary() is None:
        pytest.skip("mosquitto binary not found (apt-get install -y mosquitto)")
    report = run_federation(FederationSettings(
        dataset="breastmnist", data_dir=str(medmnist_root), clients=2, rounds=1, workdir=tmp_path / "run", federation="securedemo", secure=True,
    ))  # fmt: skip
    assert [r["round"] for r in report["rounds"]] == [1] and report["rejected_updates"] == 0
    pki = tmp_path / "run" / "pki"
    conf = (pki / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "allow_anonymous false" in conf
    log = (pki / "mosquitto.log").read_text()
    for identity in ("server", "site-1", "site-2"):
        assert f"as {identity} " in log and f"u'{identity}'" in log, log[-2000:]
    assert (tmp_path / "run" / "pki" / "sites" / "site-1" / "agent.yaml").exists()
