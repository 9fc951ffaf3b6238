"""Synchronous rounds vs FedBuff (server/fedbuff.py) with stragglers: wall-clock seconds until the global
reaches a test AUC on PneumoniaMNIST, same seeds, in the same run.

Each federation is the real round server and real agents (threads of this process) over the in-process
broker (fedge.memory_transport). A straggler (20% of the sites) trains 2x slower (its local training,
then as long again asleep) and its session paces every payload through fedge.linkemu's token buckets
at the link rate, the same limiter `--emulate-link` puts in the MQTT transport. What it leaves out: a
broker process and the network (see benchmarks/scale.py for those).

    FEDGE_DATA_DIR=../shared/data nice -n 10 .venv/bin/python benchmarks/fedbuff.py --report benchmarks/results/fedbuff.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Settings:
    sites: int = 5
    stragglers: int = 1  # 20%
    slowdown: float = 2.0  # the stragglers' training time, times
    link_mbps: float = 1.0  # the stragglers' uplink and downlink
    target_auc: float = 0.93
    budget_s: float = 240.0  # per federation: stop here if the target is not reached
    buffer: int = 3  # FedBuff's K
    max_staleness: int = 8
    epochs: int = 1
    lr: float = 1e-3
    alpha: float = 1.0  # Dirichlet label skew of the split
    dataset: str = "pneumoniamnist"
    round_timeout: float = 120.0


class _Reached(Exception):
    """Raised from the server's on_round once the target (or the time budget) is reached: ends the run."""


def _slow(task: Any, factor: float) -> Any:
    """`task` whose local training takes `factor` times as long (the rest spent asleep, not on the CPU)."""

    class Slow:
        def __getattr__(self, name: str) -> Any:
            return getattr(task, name)

        def train_local(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = task.train_local(*args, **kwargs)
            time.sleep((factor - 1) * (time.perf_counter() - started))
            return result

    return Slow()


def _paced_factory(broker: Any) -> Any:
    """A SessionFactory over `broker` that honours the agent's link (LinkEmulator) as MqttSession does."""
    from fedge.memory_transport import MemorySession

    class Paced(MemorySession):
        link: Any = None

        def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 120.0) -> None:
            if self.link is not None and payload:
                self.link.uplink.consume(len(payload))
            super().publish(topic, payload, retain=retain, timeout=timeout)

        def get(self, timeout: float) -> Any:
            msg = super().get(timeout)
            if msg is not None and self.link is not None:
                self.link.downlink.consume(len(msg.payload))
            return msg

    def factory(client_id: str, *, will: Any = None, accept: Any = None, refuse: Any = None, max_queue_bytes: int = 256 << 20,
                link: Any = None, **_ignored: Any) -> Paced:  # fmt: skip
        session = Paced(broker, client_id, will=will, accept=accept, refuse=refuse, max_queue_bytes=max_queue_bytes)
        session.link = link
        factory.sessions.append(session)  # type: ignore[attr-defined]
        return session

    factory.sessions = []  # type: ignore[attr-defined]
    return factory


def run_one(mode: str, seed: int, settings: Settings, task: Any, workdir: Path) -> dict[str, Any]:
    import torch

    from edge_client.agent import Agent
    from edge_client.config import AgentConfig
    from fedge.data import dirichlet_split
    from fedge.memory_transport import MemoryBroker
    from server.config import ServerConfig
    from server.fedbuff import round_server

    torch.set_num_threads(1)
    sites = [f"site-{i + 1}" for i in range(settings.sites)]
    stragglers = set(sites[-settings.stragglers :]) if settings.stragglers else set()
    shards = dirichlet_split(task.splits.labels["train"], settings.sites, settings.alpha, seed)
    from fedge.protocol import TrainSettings

    config = ServerConfig(
        federation="fedbuff", broker="memory://", model=task.model_config("cnn"), checkpoint_dir=workdir / f"{mode}-{seed}", rounds=10_000,
        min_clients=settings.sites, expected_clients=tuple(sites), round_timeout=settings.round_timeout, seed=seed,
        train=TrainSettings(epochs=settings.epochs, lr=settings.lr), rounds_mode=mode,  # type: ignore[arg-type]
        buffer=settings.buffer, max_staleness=settings.max_staleness,
    )  # fmt: skip
    curve: list[dict[str, Any]] = []
    started = time.monotonic()
    reached: list[float] = []

    def on_round(record: dict[str, Any]) -> None:
        elapsed = time.monotonic() - started
        curve.append(
            {
                "version": record["round"],
                "seconds": round(elapsed, 2),
                "auc": record.get("auc"),
                "updates": record.get("staleness") or dict.fromkeys(record["clients"], 0),
            }
        )  # label: staleness (sync: 0)
        if record.get("auc", 0.0) >= settings.target_auc:
            reached.append(elapsed)
            raise _Reached
        if elapsed > settings.budget_s:
            raise _Reached

    server = round_server(config, evaluator=lambda model: task.evaluate(model, "test"), on_round=on_round)
    broker = MemoryBroker()
    factory = _paced_factory(broker)
    stop = threading.Event()
    threads = []
    for i, site in enumerate(sites):
        slow = site in stragglers
        agent_config = AgentConfig(broker="mqtt://unused:1", site=site, federation="fedbuff", state_dir=workdir / f"{mode}-{seed}-{site}", seed=seed,
                                   uplink_mbps=settings.link_mbps if slow else None, downlink_mbps=settings.link_mbps if slow else None)  # fmt: skip
        agent = Agent(agent_config, _slow(task, settings.slowdown) if slow else task, shards[i])
        thread = threading.Thread(target=agent.run, kwargs={"stop": stop, "transport": factory}, daemon=True, name=site)
        thread.start()
        threads.append(thread)
    try:
        server.run(transport=factory)
    except _Reached:
        pass
    finally:
        # What the stragglers had not yet read: every version's global reaches every site, and at 1 Mbit/s
        # a site falls behind once versions come faster than it downloads one.
        backlog = {s.client_id: s._queue.qsize() for s in factory.sessions if s.link is not None}
        stop.set()
        for session in factory.sessions:
            session.link = None  # the run is over: drain unpaced, so the next run starts without these threads
        for thread in threads:
            thread.join(60)
    staleness = [s for r in curve for s in r["updates"].values()]
    return {
        "mode": mode,
        "seed": seed,
        "seconds_to_target": round(reached[0], 2) if reached else None,
        "versions_to_target": curve[-1]["version"] if reached else None,
        "final_auc": curve[-1]["auc"] if curve else None,
        "updates_applied": len(staleness),
        "straggler_updates_applied": sum(label.split("@")[0] in stragglers for r in curve for label in r["updates"]),
        "staleness_max": max(staleness, default=0),
        "staleness_mean": round(float(np.mean(staleness)), 2) if staleness else 0.0,
        "refusals": dict(server.refusals.counts),
        "straggler_unread_messages_at_end": backlog,
        "curve": curve,
    }


def plot(report: dict[str, Any], png: Path) -> None:
    """Test AUC of each global against wall-clock seconds, one line per mode and seed, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in report["results"]:
        curve = result["curve"]
        ax.plot([c["seconds"] for c in curve], [c["auc"] for c in curve], marker="o", color="C0" if result["mode"] == "sync" else "C1",
                label=f"{result['mode']} seed {result['seed']}", alpha=0.5 + 0.25 * (result["seed"] % 3) / 2)  # fmt: skip
    ax.axhline(report["settings"]["target_auc"], color="grey", linestyle="--", label="target")
    ax.set_xlabel("seconds since the server started")
    ax.set_ylabel("test AUC of the global")
    ax.set_title(f"PneumoniaMNIST, 5 sites, 1 straggler (2x training, 1 Mbit/s), Dirichlet {report['settings']['alpha']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=float, default=Settings.budget_s)
    parser.add_argument("--buffer", type=int, default=Settings.buffer)
    parser.add_argument("--max-staleness", type=int, default=Settings.max_staleness)
    parser.add_argument("--alpha", type=float, default=Settings.alpha, help="Dirichlet label skew of the split (smaller: more skewed)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG of --report")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.report.read_text()), args.report.with_suffix(".png"))
        return
    from fedge.data import load_medmnist
    from fedge.tasks import ClassificationTask

    settings = Settings(budget_s=args.budget, buffer=args.buffer, max_staleness=args.max_staleness, alpha=args.alpha)
    task = ClassificationTask(load_medmnist(settings.dataset))  # FEDGE_DATA_DIR, else the cache
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in ("sync", "async"):
                result = run_one(mode, seed, settings, task, Path(tmp))
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": asdict(settings), "results": results}
    args.report.write_text(json.dumps(report, indent=1))
    plot(report, args.report.with_suffix(".png"))


if __name__ == "__main__":
    main()
