"""Issue 18 on a real Mosquitto: during a signed four-round federation (`fedge server`, two `fedge
agent` processes), an attacker publishes every reproducer of the fuzz campaign, signed with the
real keys (a key holder's mistake, so each one reaches the decoder it was found in). The server
and both agents keep running, refuse them with a logged reason, never hit their safety net
(`handler-error`), and the federation finishes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from brokers import Recorder

from fedge.cli.federation import signing_keys
from fedge.protocol import Chunk, RoundAnnouncement, StatusMessage, Topics, decode_envelope, open_record, sign_record
from fedge.protocol.signing import Signer
from fedge.rounds import Manifest
from fedge.transport import MqttSession

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzzlib.reproducers import REPRODUCERS, Target  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

FEDGE = [sys.executable, "-m", "fedge.cli.main"]
FED = "fuzzfed"
SITES = ("site-1", "site-2")
ABSENT = "site-3"  # selected (its status is signed), never sends: each round waits for its deadline
ROUNDS = 3


def _attack_target(recorder: Recorder, keys: dict[str, Path]) -> Target:
    """What the attacker reads off the broker (round 1's announcement and global), and the keys it holds."""
    topics = Topics(FED)
    ann = open_record(recorder.wait_for(topics.announce(1)), RoundAnnouncement, None, federation=FED)
    chunks = {}
    while len(chunks) < ann.downlink.chunks:
        for t, payload in list(recorder.messages):
            if t.startswith(topics.root + "/round/1/global/") and payload:
                chunk = Chunk.decode(payload)
                if chunk.transfer.hex() == ann.downlink.transfer:
                    chunks[chunk.index] = chunk.data
        time.sleep(0.05)
    header = decode_envelope(b"".join(chunks[i] for i in range(len(chunks)))).header
    return Target(
        federation=FED, run=ann.run, round=1, model_sha256=ann.model_sha256, uplink_codec=ann.uplink_codec,
        uplink_manifest=Manifest.from_entries(header.manifest).specs, model=header.model,
        server=Signer.load(keys["server"]), sites={site: Signer.load(keys[site]) for site in (*SITES, ABSENT)}, victim=ABSENT,
    )  # fmt: skip


def _refusals_logged(log: Path) -> int:
    return log.read_text(errors="replace").count("refused (") if log.exists() else 0


def _wait_for_refusal(log: Path, before: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while _refusals_logged(log) <= before:
        assert time.monotonic() < deadline, f"no refusal logged in {log.name} within {timeout:.0f}s"
        time.sleep(0.1)


def _wait_all_succeed(processes: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Until every process exits 0; fails as soon as one exits otherwise (an agent killed by an
    input would leave the server waiting for it round after round)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes):
        for proc, log in zip(processes, logs):
            assert proc.poll() in (None, 0), f"{log.name}: exit {proc.returncode}\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, "the federation did not finish"
        time.sleep(0.5)
    for proc, log in zip(processes, logs):
        assert proc.returncode == 0, f"{log.name}: exit {proc.returncode}\n{log.read_text(errors='replace')[-3000:]}"


def _current_round(recorder: Recorder) -> int:
    prefix = f"fedge/{FED}/round/"
    return max(int(t[len(prefix) :].split("/")[0]) for t, p in list(recorder.messages) if t.startswith(prefix) and t.endswith("/global") and p)


def test_every_reproducer_over_mosquitto_is_refused_and_the_federation_finishes(medmnist_root, tmp_path, mosquitto_broker):
    """A third selected site never sends, so every round lasts until its deadline: the server's
    reproducers go to that site's update topic (each one reaches the decoder: a refusal is logged
    before the next is sent); the agents' reproducers follow once both agents answered a round and
    wait for the next, one at a time, each announcing the current round."""
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    keys = signing_keys(tmp_path / "keys", (*SITES, ABSENT))
    topics = Topics(FED)
    recorder = Recorder(broker, "fuzz-recorder", FED)
    server_log = tmp_path / "server.log"
    server = subprocess.Popen(FEDGE + [
        "server", "--broker", broker, "--federation", FED, "--dataset", "breastmnist", "--data-dir", str(medmnist_root),
        "--rounds", str(ROUNDS), "--min-clients", "2", "--clients", ",".join((*SITES, ABSENT)), "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--round-timeout", "15", "--trusted-keys", str(keys["trusted"]), "--signing-key", str(keys["server"]),
    ], stdout=open(server_log, "wb"), stderr=subprocess.STDOUT)  # fmt: skip
    processes = [server]
    mallory = MqttSession(broker, "mallory", clean_session=True).connect()
    try:
        for site in (*SITES, ABSENT):  # round 1 opens before the agents start
            online = sign_record(StatusMessage(federation=FED, sender=site, state="online"), Signer.load(keys[site]))
            mallory.publish(topics.status(site), online, retain=True)
        target = _attack_target(recorder, keys)
        for reproducer in (r for r in REPRODUCERS if r.side == "server"):
            before = _refusals_logged(server_log)
            for msg in reproducer.build(target):
                mallory.publish(msg.topic, msg.payload)
            _wait_for_refusal(server_log, before)
        for i, site in enumerate(SITES):
            processes.append(subprocess.Popen(FEDGE + [
                "agent", "--broker", broker, "--site", site, "--federation", FED, "--dataset", "breastmnist",
                "--data-dir", str(medmnist_root), "--shard", str(i), "--num-shards", "2", "--alpha", "1.0",
                "--state-dir", str(tmp_path / site), "--signing-key", str(keys[site]), "--server-key", str(keys["server.pub"]),
            ], stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{site}.log", "wb")))  # fmt: skip
        rnd = _current_round(recorder)
        for site in SITES:  # both agents answered the open round and wait for the next
            recorder.wait_for(topics.update_chunk(rnd, site, 0), timeout=180)
        for reproducer in (r for r in REPRODUCERS if r.side == "agent"):
            assert [p.poll() for p in processes] == [None, None, None], f"a process ended before {reproducer.name}"
            for msg in reproducer.build(replace(target, round=_current_round(recorder))):
                mallory.publish(msg.topic, msg.payload)
            time.sleep(1)  # one at a time: an agent decodes the global it was announced last
        _wait_all_succeed(processes, [server_log] + [tmp_path / f"{site}.log" for site in SITES], timeout=400)
    finally:
        mallory.close()
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
        recorder.close()
    server_text = server_log.read_text()
    summary = json.loads(server_text.split("refused inputs this run, by kind: ")[1].splitlines()[0])
    assert summary.get("bad-envelope", 0) >= 4 and "handler-error" not in summary, summary
    assert "Traceback" not in server_text
    for site in SITES:
        text = (tmp_path / f"{site}.log").read_text()
        kinds = json.loads(text.split("refused inputs, by kind: ")[1].splitlines()[0])
        assert kinds.get("bad-record", 0) >= 6 and kinds.get("bad-global", 0) >= 4 and "handler-error" not in kinds, (site, kinds)
        assert "Traceback" not in text, site
    assert (tmp_path / "ckpt" / "final.safetensors").exists()
