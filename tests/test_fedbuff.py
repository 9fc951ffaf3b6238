"""Asynchronous rounds (FedBuff, server/fedbuff.py) over the in-process broker: a late update is taken
with its staleness weight, one past max_staleness and a replay are refused and counted, every K
accepted updates make an aggregate, a restart mid-buffer loses no accepted update, and real agents
follow the versions without waiting for a round to close."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import pytest
from clocks import SteppedClock, wait_until

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge.data import dirichlet_split, load_medmnist
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig
from fedge.protocol import RoundAnnouncement, StatusMessage, Topics, open_record, sign_record
from fedge.rounds import make_update
from fedge.tasks import ClassificationTask
from server.config import ServerConfig
from server.fedbuff import AsyncRoundServer, round_server, scale_delta, staleness_weight
from server.rounds import RoundServer

FED = "fedbuff"
MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})
SITES = ("site-1", "site-2", "site-3")


def test_staleness_weight_is_fedbuffs_one_over_sqrt_one_plus_staleness() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(1) == pytest.approx(0.7071067811865476)
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_scaling_keeps_sparse_updates_sparse() -> None:
    from compression import SparseTensor

    sparse = SparseTensor((2, 3), np.array([1, 4], dtype=np.int64), np.array([2.0, -4.0], dtype=np.float32))
    out = scale_delta({"a": np.ones((2,), np.float32), "b": sparse}, 0.5)
    assert out["a"].dtype == np.float32 and out["a"].tolist() == [0.5, 0.5]
    b = out["b"]
    assert isinstance(b, SparseTensor) and b.indices.tolist() == [1, 4] and b.values.tolist() == [1.0, -2.0] and b.values.dtype == np.float32


def test_an_async_announcement_names_its_staleness_and_a_sync_one_parses_as_before() -> None:
    from fedge.protocol import TransferInfo

    fields = dict(federation=FED, sender="server", run="0" * 32, round=3, deadline=0.0, model_sha256="0" * 64, downlink_kind="full",
                  uplink_codec="fp32", downlink=TransferInfo(transfer="0" * 32, chunks=1, bytes=1, sha256="0" * 64))  # fmt: skip
    sync = RoundAnnouncement(**fields)  # type: ignore[arg-type]
    assert "max_staleness" not in sync.model_dump_json()  # an agent from before the field (extra forbidden) still parses it
    asyn = RoundAnnouncement(**fields, max_staleness=2)  # type: ignore[arg-type]
    assert RoundAnnouncement.model_validate_json(asyn.model_dump_json()).max_staleness == 2


def test_the_mode_picks_the_server_and_checks_its_settings(tmp_path) -> None:
    base = dict(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp_path / "c")
    assert type(round_server(ServerConfig(**base))) is RoundServer  # type: ignore[arg-type]
    assert type(round_server(ServerConfig(**base, rounds_mode="async", buffer=3))) is AsyncRoundServer  # type: ignore[arg-type]
    for bad in ({"buffer": 0}, {"max_staleness": -1}, {"rounds_mode": "fast"}):
        with pytest.raises(ValueError):
            ServerConfig(**(base | {"rounds_mode": "async"} | bad))  # type: ignore[arg-type]


class Hand:
    """The sites by hand: real signed-record status, real update envelopes of chosen constant deltas."""

    def __init__(self, broker: MemoryBroker, tmp_path, server_class: type[AsyncRoundServer] = AsyncRoundServer, **options):
        self.broker = broker
        config = dict(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp_path / "ckpt", rounds=3, min_clients=2,
                      expected_clients=SITES, round_timeout=60, wait_for_clients=60, rounds_mode="async", buffer=2, max_staleness=1)  # fmt: skip
        self.clock = SteppedClock()
        self.server = server_class(ServerConfig(**(config | options)), clock=self.clock)  # type: ignore[arg-type]
        self.topics = Topics(FED)
        self.site = broker.session("sites")
        self.site.connect()
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None
        for site in SITES:
            self.site.publish(self.topics.status(site), sign_record(StatusMessage(federation=FED, sender=site, state="online"), None), retain=True)

    def start(self) -> None:
        def run() -> None:
            try:
                self.server.run(transport=self.broker.session)
            except BaseException as exc:  # surfaced by the test
                self.errors.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def announcement(self, version: int) -> RoundAnnouncement:
        topic = self.topics.announce(version)
        wait_until(f"version {version}", lambda: topic in self.broker.retained)
        return open_record(self.broker.retained[topic], RoundAnnouncement, None, federation=FED)

    def update(self, site: str, version: int, value: float, samples: int) -> bytes:
        """`site`'s envelope for `version`: every tensor's delta is `value`."""
        ann = self.announcement(version)
        assert ann.max_staleness == self.server.config.max_staleness
        delta = {t.name: np.full(t.shape, value, np.float32) for t in self.server.uplink_manifest}
        return make_update(delta, codec="fp32", federation=FED, site=site, round=version, run=ann.run, model_sha256=ann.model_sha256,
                           num_samples=samples, metrics={})  # fmt: skip

    def send(self, site: str, version: int, envelope: bytes) -> None:
        self.site.publish_chunked(lambda i: self.topics.update_chunk(version, site, i), envelope)

    def join(self) -> None:
        """Once the last version is aggregated, its sites report their upload time as agents do, under
        the version each trained from (the server waits for those reports, on its clock that stands
        still here, before it finishes)."""
        rounds = self.server.config.rounds
        wait_until(f"version {rounds}'s aggregate", lambda: len(self.server.state.history) >= rounds)
        for label in self.server.state.history[-1]["staleness"]:
            site, version = label.rsplit("@", 1)
            report = StatusMessage(federation=FED, sender=site, state="online", round=int(version), metrics={"upload_seconds": 0.0})
            self.site.publish(self.topics.status(site), sign_record(report, None), retain=True)
        assert self.thread is not None
        self.thread.join(60)
        assert not self.thread.is_alive() and not self.errors, self.errors


def _moved(before: dict[str, np.ndarray], after: dict[str, np.ndarray], stats: bool | None = None) -> float:
    """The one value every tensor moved by (the updates are constants); `stats`: only the normalisation
    statistics (True) or only the rest (False)."""
    from fedge.weights import norm_stat_names

    names = set(norm_stat_names(before))
    diffs = {k: after[k] - before[k] for k in before if stats is None or (k in names) == stats}
    value = float(next(iter(diffs.values())).flat[0])
    assert all(np.allclose(d, value, atol=1e-6) for d in diffs.values())
    return value


def test_a_late_update_is_weighted_by_its_staleness_and_one_past_max_staleness_or_replayed_is_refused(tmp_path) -> None:
    hand = Hand(MemoryBroker(), tmp_path)
    start = {k: v.copy() for k, v in hand.server.state.weights.items()}
    hand.start()
    late = hand.update("site-3", 1, 0.02, 20)  # trained from version 1 (made while its announcement is retained) ...
    hand.send("site-1", 1, hand.update("site-1", 1, 0.01, 10))
    hand.send("site-2", 1, hand.update("site-2", 1, 0.04, 30))  # K=2: version 1 closes
    after_1 = hand.announcement(2)
    hand.send("site-3", 1, late)  # ... arrives while version 2 is open: staleness 1, accepted
    wait_until("site-3's late update in the buffer", lambda: "site-3@1" in hand.server.buffer)
    hand.send("site-3", 2, hand.update("site-3", 2, 1.0, 100))  # K=2, 3 sites: one update per site per aggregate, this one waits
    fresh = hand.update("site-1", 2, -0.03, 10)
    hand.send("site-1", 2, fresh)  # K=2: version 2 closes
    hand.announcement(3)
    hand.send("site-1", 2, fresh)  # a replay: site-1's update for version 2 (in the window) counted already
    too_old = make_update({t.name: np.full(t.shape, 9.0, np.float32) for t in hand.server.uplink_manifest}, codec="fp32", federation=FED,
                          site="site-2", round=1, run=after_1.run, model_sha256=hand.announcement(3).model_sha256, num_samples=1, metrics={})  # fmt: skip
    hand.send("site-2", 1, too_old)  # version 1 is 2 behind version 3: past max_staleness 1
    other_run = make_update({t.name: np.full(t.shape, 9.0, np.float32) for t in hand.server.uplink_manifest}, codec="fp32", federation=FED,
                            site="site-1", round=3, run="f" * 32, model_sha256=hand.announcement(3).model_sha256, num_samples=1, metrics={})  # fmt: skip
    hand.send("site-1", 3, other_run)  # an update of another run, for a version in the window: refused
    hand.send("site-2", 3, hand.update("site-2", 3, 0.05, 10))  # with site-3's waiting update: version 3 closes
    hand.join()

    history = hand.server.state.history
    assert [r["staleness"] for r in history] == [{"site-1@1": 0, "site-2@1": 0}, {"site-1@2": 0, "site-3@1": 1}, {"site-2@3": 0, "site-3@2": 1}]
    assert [r["clients"] for r in history] == [["site-1", "site-2"], ["site-1", "site-3"], ["site-2", "site-3"]]  # per site, for metrics
    from fedge.checkpoint import load_checkpoint

    def weights(rnd: int) -> dict[str, np.ndarray]:
        state = load_checkpoint(hand.server.store.model_path(rnd)).state
        return {k: state[k].numpy() for k in start}

    w1, w2, w3 = weights(1), weights(2), weights(3)
    # By hand: FedAvg by samples of each update times 1/sqrt(1 + staleness).
    assert _moved(start, w1) == pytest.approx((10 * 0.01 + 30 * 0.04) / 40, rel=1e-5)
    assert _moved(w1, w2, stats=False) == pytest.approx((20 * 0.02 / math.sqrt(2) + 10 * -0.03) / 30, rel=1e-5)
    # BatchNorm statistics are values: the late site's are rebased onto version 2's (its delta minus how far they moved since).
    moved_1 = (10 * 0.01 + 30 * 0.04) / 40
    assert _moved(w1, w2, stats=True) == pytest.approx((20 * (0.02 - moved_1) / math.sqrt(2) + 10 * -0.03) / 30, rel=1e-4)
    # site-3's update trained from version 2 waited for version 3's aggregate: staleness (and weight) as of then.
    assert _moved(w2, w3, stats=False) == pytest.approx((100 * 1.0 / math.sqrt(2) + 10 * 0.05) / 110, rel=1e-5)
    moved_2 = _moved(w1, w2, stats=True)
    assert _moved(w2, w3, stats=True) == pytest.approx((100 * (1.0 - moved_2) / math.sqrt(2) + 10 * 0.05) / 110, rel=1e-4)
    assert hand.server.refusals.counts["wrong-run"] == 1
    refused = [detail for kind, detail in hand.server.refusals.recent if kind == "unexpected-topic"]
    assert any("site-1" in d and "already counted" in d and "/round/2/" in d for d in refused)
    assert any("/round/1/update/site-2" in d and "max staleness 1" in d for d in refused)


def test_a_restart_mid_buffer_keeps_the_accepted_update_and_still_refuses_its_replay(tmp_path) -> None:
    broker = MemoryBroker()
    first = Hand(broker, tmp_path, rounds=2)
    start = {k: v.copy() for k, v in first.server.state.weights.items()}
    first.start()
    counted = first.update("site-1", 1, 0.01, 10)
    first.send("site-1", 1, counted)
    wait_until("the update in the buffer", lambda: "site-1@1" in first.server.buffer)
    assert first.server.session is not None
    first.server.session.drop()  # the server dies: its next publish (the deadline's re-announcement) fails
    first.clock.advance(first.server.config.round_timeout + 1)
    assert first.thread is not None
    first.thread.join(60)
    assert isinstance(first.errors[0], ConnectionError)

    second = Hand(broker, tmp_path, rounds=2)
    assert list(second.server.buffer) == ["site-1@1"]  # re-read, re-verified and re-decoded from the checkpoint folder
    second.start()
    second.announcement(1)
    second.send("site-1", 1, counted)  # replayed after the restart: counted once
    second.send("site-2", 1, second.update("site-2", 1, 0.04, 30))
    second.send("site-1", 2, second.update("site-1", 2, 0.02, 10))
    second.send("site-3", 2, second.update("site-3", 2, 0.02, 10))
    second.join()
    assert [list(r["staleness"]) for r in second.server.state.history] == [["site-1@1", "site-2@1"], ["site-1@2", "site-3@2"]]
    from fedge.checkpoint import load_checkpoint

    state = load_checkpoint(second.server.store.model_path(1)).state
    assert _moved(start, {k: state[k].numpy() for k in start}) == pytest.approx((10 * 0.01 + 30 * 0.04) / 40, rel=1e-5)
    assert any("site-1" in d and "already counted" in d for k, d in second.server.refusals.recent if k == "unexpected-topic")
    assert not list((tmp_path / "ckpt" / "async").glob("*.fdg"))  # applied updates' envelopes are deleted


class DiesAfterCheckpoint(AsyncRoundServer):
    """Killed between round 2's checkpoint and the async.json that follows it."""

    def _save_async(self, applying: list[str] | None = None) -> None:
        if applying is None and self.state.round == 2:
            raise OSError("killed after the checkpoint")
        super()._save_async(applying)


def test_a_crash_between_an_aggregate_and_its_commit_applies_it_once_and_keeps_what_waited(tmp_path) -> None:
    broker = MemoryBroker()
    first = Hand(broker, tmp_path, DiesAfterCheckpoint, rounds=3)
    first.start()
    late = first.update("site-3", 1, 0.01, 10)  # while version 1's announcement is retained
    first.send("site-1", 1, first.update("site-1", 1, 0.01, 10))
    first.send("site-2", 1, first.update("site-2", 1, 0.01, 10))
    first.announcement(2)
    first.send("site-3", 1, late)
    wait_until("site-3's late update", lambda: "site-3@1" in first.server.buffer)
    first.send("site-3", 2, first.update("site-3", 2, 0.02, 10))  # waits: site-3 already has one in this aggregate
    first.send("site-1", 2, first.update("site-1", 2, 0.01, 10))  # version 2's aggregate, then the crash
    assert first.thread is not None
    first.thread.join(60)
    assert isinstance(first.errors[0], OSError)

    second = Hand(broker, tmp_path, rounds=3)
    assert second.server.state.round == 2 and list(second.server.buffer) == ["site-3@2"]  # applied once; the waiting one kept
    second.start()
    second.send("site-2", 3, second.update("site-2", 3, 0.01, 10))
    second.join()
    assert second.server.state.history[-1]["staleness"] == {"site-2@3": 0, "site-3@2": 1}


@pytest.fixture(scope="module")
def task(medmnist_root) -> ClassificationTask:
    return ClassificationTask(load_medmnist("breastmnist", medmnist_root))


def test_agents_follow_the_versions_without_waiting_for_a_round_to_close(task, tmp_path) -> None:
    """Two real agents, an aggregate after every update (K=1): the site whose update closed a version
    trains the next at once while the other's update arrives stale; a delta downlink of a version a
    site skipped is replaced by the snapshot."""
    broker = MemoryBroker()
    config = ServerConfig(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=tmp_path / "ckpt", rounds=4, min_clients=2,
                          expected_clients=SITES[:2], round_timeout=60, wait_for_clients=60, rounds_mode="async", buffer=1,
                          max_staleness=3, downlink_codec="q8,ef|zstd")  # fmt: skip
    server = round_server(config)
    shards = dirichlet_split(task.splits.labels["train"], 2, 1.0, 0)
    agents = [Agent(AgentConfig(broker="mqtt://unused:1", site=s, federation=FED, state_dir=tmp_path / s), task, shards[i][:64])
              for i, s in enumerate(SITES[:2])]  # fmt: skip
    errors: list[BaseException] = []

    def guarded(target: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(lambda: server.run(transport=broker.session)), daemon=True)]
    threads += [threading.Thread(target=guarded(lambda a=a: a.run(transport=broker.session)), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()
    assert not errors, errors
    history = server.state.history
    assert [len(r["clients"]) for r in history] == [1, 1, 1, 1]
    assert all(agent.finished and agent.refusals.total == 0 for agent in agents)
    assert sum(len(agent.rounds_done) for agent in agents) >= 4
    assert all(np.isfinite(v).all() for v in server.state.weights.values())


class SlowFirstRound:
    """The site's task, whose first local training finishes only when the test lets it (a straggler)."""

    def __init__(self, task: ClassificationTask):
        self.task, self.gate, self.started = task, threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def train_local(self, *args, **kwargs):
        if not self.started.is_set():
            self.started.set()
            assert self.gate.wait(60)
        return self.task.train_local(*args, **kwargs)


def test_a_straggling_agent_is_counted_late_then_skips_to_the_newest_version_through_the_snapshot(task, tmp_path, caplog) -> None:
    hand = Hand(MemoryBroker(), tmp_path, rounds=4, buffer=1, max_staleness=2, downlink_codec="q8,ef|zstd")
    hand.start()
    slow = SlowFirstRound(task)
    config = AgentConfig(broker="mqtt://unused:1", site="site-1", federation=FED, state_dir=tmp_path / "site-1")
    agent = Agent(config, slow, dirichlet_split(task.splits.labels["train"], 2, 1.0, 0)[0][:64])  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            agent.run(transport=hand.broker.session)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    with caplog.at_level("INFO", logger="fedge.agent"):
        thread.start()
        assert slow.started.wait(60)  # site-1 trains version 1 ...
        hand.send("site-2", 1, hand.update("site-2", 1, 0.01, 10))  # ... while the others move on (K=1)
        hand.send("site-3", 2, hand.update("site-3", 2, 0.01, 10))
        hand.announcement(3)  # a delta from version 2: site-1 holds version 1's global
        slow.gate.set()
        hand.join()
        thread.join(60)
    assert not thread.is_alive() and not errors and agent.finished
    history = hand.server.state.history
    assert history[2]["staleness"] == {"site-1@1": 2}  # two versions late, within max staleness 2: counted (weight 1/sqrt(3))
    assert list(history[3]["staleness"]) in (["site-1@3"], ["site-1@4"])  # it trained the newest version it had, not version 2
    assert agent.rounds_done[:2] in ([1, 3], [1, 4]) and 2 not in agent.rounds_done  # (it may train version 4 as the end comes)
    assert "site-1: fetching a full snapshot" in caplog.text and agent.refusals.total == 0


def test_a_site_that_holds_the_previous_global_takes_the_delta_downlink_not_the_snapshot(task, tmp_path, caplog) -> None:
    """Synchronous rounds with a downlink codec: the delta applies to what the site holds (an off-by-one
    in the agent made every site fetch the full snapshot as well, every round)."""
    from test_rounds_memory import Federation

    fed = Federation(MemoryBroker(), task, tmp_path, rounds=3, downlink_codec="q8,ef|zstd")
    with caplog.at_level("INFO", logger="fedge.agent"):
        fed.start_server()
        for site in ("site-1", "site-2"):
            fed.start_agent(site)
        fed.join()
    assert all(agent.rounds_done == [1, 2, 3] and agent.refusals.total == 0 for agent in fed.agents.values())
    assert "fetching a full snapshot" not in caplog.text


def test_the_server_command_takes_the_rounds_mode() -> None:
    from typer.testing import CliRunner

    from fedge.cli.main import app

    result = CliRunner().invoke(app, ["server", "--rounds-mode", "fast", "--data-dir", "/nonexistent"])
    assert result.exit_code == 2 and "choose sync or async" in result.output


@pytest.mark.integration
def test_an_async_demo_over_the_embedded_broker_with_signatures_and_a_delta_downlink(medmnist_root, tmp_path) -> None:
    """The same over MQTT (amqtt), with agent processes, signed records and updates, and q8 delta globals."""
    from fedge.cli.federation import FederationSettings, run_federation

    settings = FederationSettings(dataset="breastmnist", data_dir=str(medmnist_root), clients=3, rounds=3, workdir=tmp_path / "run",
                                  rounds_mode="async", buffer=2, max_staleness=2, downlink_codec="q8,ef|zstd")  # fmt: skip
    report = run_federation(settings, report_path=tmp_path / "report.json")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    for record in report["rounds"]:
        assert len(record["staleness"]) == 2 and all(0 <= s <= 2 for s in record["staleness"].values())
    assert np.isfinite(report["final"]["auc"]) and report["rounds_mode"] == "async buffer 2 max staleness 2"
