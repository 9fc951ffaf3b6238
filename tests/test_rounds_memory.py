"""The round logic of the server and the agents, over the in-process broker: announcement, training,
refusal, quorum, deadline, re-announcement and resume, in seconds and without a broker process
(tests/test_federation.py runs the same over amqtt and Mosquitto). Deadlines pass when the test moves
the server's clock, once it has seen what it expects before them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from clocks import SteppedClock, wait_until

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge.data import dirichlet_split, load_medmnist
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig
from fedge.protocol import Chunk, RoundAnnouncement, StatusMessage, Topics, open_record, sign_record
from fedge.tasks import ClassificationTask
from server.config import ServerConfig
from server.rounds import RoundServer

FED = "mem"
MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})


@pytest.fixture(scope="module")
def task(medmnist_root) -> ClassificationTask:
    return ClassificationTask(load_medmnist("breastmnist", medmnist_root))


class Federation:
    def __init__(self, broker: MemoryBroker, task: ClassificationTask, tmp_path, **server_options):
        self.broker, self.task, self.tmp_path = broker, task, tmp_path
        config = dict(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp_path / "ckpt", rounds=2, min_clients=2,
                      expected_clients=("site-1", "site-2"), round_timeout=60, wait_for_clients=60)  # fmt: skip
        self.clock = SteppedClock()
        self.server = RoundServer(ServerConfig(**(config | server_options)), clock=self.clock)
        self.shards = dirichlet_split(task.splits.labels["train"], 2, 1.0, 0)
        self.threads: list[threading.Thread] = []
        self.agents: dict[str, Agent] = {}
        self.errors: list[BaseException] = []

    def _thread(self, target, name: str) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced by join()
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def start_server(self) -> None:
        self._thread(lambda: self.server.run(transport=self.broker.session), "server")

    def start_agent(self, site: str, **options) -> Agent:
        config = AgentConfig(broker="mqtt://unused:1", site=site, federation=FED, state_dir=self.tmp_path / site, **options)
        agent = Agent(config, self.task, self.shards[int(site[-1]) - 1][:64])
        self.agents[site] = agent
        self._thread(lambda: agent.run(transport=self.broker.session), site)
        return agent

    def run(self, sites: tuple[str, ...] = ("site-1", "site-2")) -> None:
        """The server and an agent per site, until all of them finish."""
        self.start_server()
        for site in sites:
            self.start_agent(site)
        self.join()

    def join(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
            assert not thread.is_alive(), f"{thread.name} did not finish"
        assert not self.errors, self.errors

    def pass_deadline_once(self, rnd: int, awaiting: set[str], what: str, seen: Callable[[], bool] = lambda: True) -> None:
        """Once round `rnd` waits only for `awaiting` and `seen()` holds, move the clock past its deadline."""
        wait_until(what, lambda: self.server.awaiting == (rnd, frozenset(awaiting)) and seen())
        self.clock.advance(self.server.config.round_timeout + 1)

    def announcements(self, rnd: int) -> list[RoundAnnouncement]:
        topic = Topics(FED).announce(rnd)
        return [open_record(m.payload, RoundAnnouncement, None, federation=FED) for m in self.broker.published if m.topic == topic and m.payload]


def test_two_sites_two_rounds(task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), task, tmp_path)
    fed.run()
    assert [r["clients"] for r in fed.server.state.history] == [["site-1", "site-2"]] * 2
    assert all(agent.rounds_done == [1, 2] and agent.finished for agent in fed.agents.values())
    assert all(agent.run_id == fed.server.run_id for agent in fed.agents.values())
    assert fed.server.refusals.total == 0 and all(a.refusals.total == 0 for a in fed.agents.values())
    assert all(np.isfinite(v).all() for v in fed.server.state.weights.values())
    # Full-model downlink: each round's model is published once (round topic); the snapshot only at the end.
    topics = Topics(FED)
    snapshots = [m for m in fed.broker.published if m.topic.startswith(topics.snapshot + "/") and m.payload]
    globals_ = [m for m in fed.broker.published if m.topic.startswith(topics.root + "/round/") and "/global/" in m.topic and m.payload]
    assert len({Chunk.decode(m.payload).transfer for m in snapshots}) == 1
    assert len({Chunk.decode(m.payload).transfer for m in globals_}) == 2
    for record, rnd in zip(fed.server.state.history, (1, 2)):
        sent = sum(len(Chunk.decode(m.payload).data) for m in globals_ if f"/round/{rnd}/global/" in m.topic)
        assert record["downlink_bytes"] == 2 * sent  # what each of the two selected sites fetches


def test_a_site_that_refuses_the_codec_is_waited_for_until_the_deadline_then_the_quorum_aggregates(task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), task, tmp_path, rounds=1, min_clients=1)
    fed.start_server()
    fed.start_agent("site-1")
    pinned = fed.start_agent("site-2", codec="q8,ef|zstd")
    skipped = lambda: pinned.answered is not None and pinned.answered.round == 1  # noqa: E731
    fed.pass_deadline_once(1, {"site-2"}, "site-1's update and site-2's refusal of round 1", skipped)
    fed.join()
    assert fed.server.state.history[0]["clients"] == ["site-1"]
    assert pinned.rounds_done == [] and pinned.finished  # it skipped the round, and still heard the end
    assert len(fed.announcements(1)) == 1  # quorum met at the deadline: no re-announcement


def test_below_quorum_at_the_deadline_the_round_is_re_announced_and_a_late_site_joins(task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), task, tmp_path, rounds=1, min_clients=2, expected_clients=())
    status = fed.broker.session("site-2-status")  # site-2 is online (so selected) but its agent starts after the deadline
    status.connect()
    status.publish(Topics(FED).status("site-2"), sign_record(StatusMessage(federation=FED, sender="site-2", state="online"), None), retain=True)
    fed.start_server()
    fed.start_agent("site-1")
    fed.pass_deadline_once(1, {"site-2"}, "site-1's update of round 1")
    wait_until("round 1's re-announcement", lambda: len(fed.announcements(1)) == 2)
    fed.start_agent("site-2")
    fed.join()
    assert fed.server.state.history[0]["clients"] == ["site-1", "site-2"]
    # site-1 answered the re-announcement with its cached update, byte for byte, instead of training again.
    sent = [Chunk.decode(m.payload).data for m in fed.broker.published if m.topic == Topics(FED).update_chunk(1, "site-1", 0)]
    assert len(sent) == 2 and sent[0] == sent[1]


class FailsOnce:
    """The site's task, whose first local training fails as a full disk would."""

    def __init__(self, task: ClassificationTask):
        self.task, self.failed = task, False

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def train_local(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        return self.task.train_local(*args, **kwargs)


def test_a_round_that_fails_at_a_site_is_skipped_and_the_agent_takes_the_next(task, tmp_path) -> None:
    fed = Federation(MemoryBroker(), task, tmp_path, min_clients=1)
    fed.start_server()
    fed.start_agent("site-1")
    config = AgentConfig(broker="mqtt://unused:1", site="site-2", federation=FED, state_dir=tmp_path / "site-2")
    failing = Agent(config, FailsOnce(task), fed.shards[1][:64])  # type: ignore[arg-type]
    fed.agents["site-2"] = failing
    fed._thread(lambda: failing.run(transport=fed.broker.session), "site-2")
    fed.pass_deadline_once(1, {"site-2"}, "site-1's update and site-2's failure in round 1", lambda: failing.refusals.counts["round-error"] == 1)
    fed.join()
    # Round 1 closes at its deadline without site-2; round 2 has both.
    assert [r["clients"] for r in fed.server.state.history] == [["site-1"], ["site-1", "site-2"]]
    assert failing.rounds_done[-1] == 2 and failing.finished
    errors = [detail for kind, detail in failing.refusals.recent if kind == "round-error"]
    assert len(errors) == 1 and "round 1: OSError" in errors[0] and "No space left on device" in errors[0]


def test_a_restarted_server_resumes_its_run_and_the_agents_follow(task, tmp_path) -> None:
    broker = MemoryBroker()
    first = Federation(broker, task, tmp_path, rounds=1)
    first.run()
    run = first.server.run_id

    second = Federation(broker, task, tmp_path, rounds=2)
    assert second.server.state.round == 1 and second.server.run_id == run
    assert Topics(FED).control in broker.retained  # the first server's `finished`, of this same run
    second.start_server()
    # A restarted server clears it before agents may take it as the end.
    wait_until("the restarted server to clear `finished`", lambda: Topics(FED).control not in broker.retained)
    for site in ("site-1", "site-2"):
        second.start_agent(site)
    second.join()
    assert [r["round"] for r in second.server.state.history] == [1, 2]
    assert all(agent.rounds_done == [2] for agent in second.agents.values())


@pytest.mark.parametrize(
    "bad",
    [
        ["--mode", "sparse"],
        ["--codec", "topk:2|q9"],
        ["--clients", "0"],
        ["--mode-options", "r=8"],
        ["--rounds-mode", "fast"],
        ["--rounds-mode", "async", "--buffer", "0"],
        ["--max-staleness", "-1"],
        ["--augment", "--dp-noise-multiplier", "1.0"],
        ["--task", "ldct", "--augment"],
        ["--lr-schedule", "cosnie"],
        ["--local-optimizer", "rmsprop"],
    ],
)
def test_a_bad_demo_option_leaves_the_previous_run_untouched(tmp_path, medmnist_root, bad) -> None:
    from typer.testing import CliRunner

    from fedge.cli.main import app

    workdir = tmp_path / "demo"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "final.safetensors").write_bytes(b"the last demo's model")
    result = CliRunner().invoke(app, ["demo", "--data-dir", str(medmnist_root), "--dataset", "breastmnist", "--workdir", str(workdir), *bad])
    assert result.exit_code == 2, result.output
    assert (workdir / "checkpoints" / "final.safetensors").read_bytes() == b"the last demo's model"
