"""One machine, one federation: embedded broker, the server in this process, one process per site.

`fedge demo` and the benchmarks call `run_federation`; it returns the report dict.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedge.protocol.messages import LocalOptimizer, ModeName

if TYPE_CHECKING:
    from fedge.schedule import LrSchedule
    from fedge.tasks.base import Task, TaskName
    from server.watch import WatchSettings


@dataclass(frozen=True)
class FederationSettings:
    task: TaskName = "classification"
    dataset: str = "pneumoniamnist"
    data_dir: str | None = None
    ct_dir: str | None = None  # ldct: the CT series the sites share out (default: the data root's head CT)
    protocols: tuple[str, ...] = ()  # ldct: one scan protocol I0:VIEWS[:NOISE] per site
    image_size: int | None = None  # ldct: resample slices to this size (default: SimulationConfig's, 128)
    clients: int = 4
    rounds: int = 10
    codec: str = "fp32"
    downlink_codec: str | None = None
    arch: str = "cnn"
    seed: int = 0
    alpha: float = 1.0
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    broker: str | None = None
    federation: str = "demo"
    workdir: Path = Path("runs/demo")
    round_timeout: float = 300.0
    model_options: dict[str, Any] = field(default_factory=dict)
    mode: ModeName = "full"
    mode_options: dict[str, Any] = field(default_factory=dict)
    init: Path | None = None  # pretrained checkpoint (head re-initialised if the class count differs)
    emulate_link: str | None = None  # device profile name/path: pace each agent's MQTT traffic to its link
    signed: bool = True  # fresh Ed25519 keys for the server and every site, in <workdir>/keys
    secure: bool = False  # provision a CA, certificates and ACLs into <workdir>/pki and run Mosquitto with them
    strategy: str = "fedavg"  # server.strategies: a robust rule, or dp_fedavg (client-level central DP)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    augment: bool = False  # sites flip and shift their training images (TrainSettings.augment)
    logit_adjust: float = 0.0  # tau of the sites' logit-adjusted loss (TrainSettings.logit_adjust)
    calibrate_head: bool = False  # one head-calibration round after the last (ServerConfig.calibrate_head)
    local_optimizer: LocalOptimizer = "adam"  # the sites' local step (TrainSettings.optimizer)
    lr_schedule: LrSchedule = "constant"  # each round's announced lr (fedge.schedule)
    dp_noise_multiplier: float | None = None  # record-level DP: DP-SGD at every site (the cnn is then built with GroupNorm)
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    # server.fedbuff: asynchronous rounds, an aggregate every `buffer` updates (sync: the default rounds)
    rounds_mode: Literal["sync", "async"] = "sync"
    buffer: int = 2
    max_staleness: int = 4
    # The operator's view of the server (server.watch): Prometheus metrics, live dashboard, experiment tracking.
    metrics_port: int | None = None
    dashboard: str | None = None  # HOST:PORT or PORT (host 127.0.0.1)
    dashboard_token: str | None = None
    mlflow: str | None = None
    tensorboard: Path | None = None
    linger: float = 0.0  # seconds the dashboard and metrics stay up after the last round

    def watch(self) -> WatchSettings:
        """The server.watch.WatchSettings of these settings (checked: a bad one raises ValueError)."""
        from server.watch import WatchSettings

        return WatchSettings(metrics_port=self.metrics_port, dashboard=self.dashboard, dashboard_token=self.dashboard_token,
                             mlflow=self.mlflow, tensorboard=self.tensorboard, linger=self.linger)  # fmt: skip


def _check(settings: FederationSettings) -> None:
    """Refuse settings that cannot run before anything is deleted or started."""
    if settings.clients < 1 or settings.rounds < 1 or settings.epochs < 1:
        raise ValueError("clients, rounds and epochs must each be at least 1")
    if settings.alpha <= 0 or settings.round_timeout <= 0:
        raise ValueError("alpha (Dirichlet skew) and round_timeout must be positive")
    if settings.rounds_mode not in ("sync", "async") or settings.buffer < 1 or not 0 <= settings.max_staleness <= 1000:
        raise ValueError(f"--rounds-mode sync|async (got {settings.rounds_mode!r}), --buffer >= 1, --max-staleness 0..1000")
    from fedge.tasks.base import check_task_arch

    check_task_arch(settings.task, settings.arch)
    if settings.task == "ldct" and len(settings.protocols) != settings.clients:
        raise ValueError(f"--task ldct: give one --protocol per site ({settings.clients}, got {len(settings.protocols)})")
    if settings.task == "ldct" and (settings.dp_noise_multiplier is not None or settings.augment or settings.logit_adjust):
        from fedge.tasks.ldct import NO_AUGMENT, NO_DP, NO_LOGIT_ADJUST

        raise ValueError(NO_DP if settings.dp_noise_multiplier is not None else NO_AUGMENT if settings.augment else NO_LOGIT_ADJUST)
    if settings.calibrate_head:
        from server.config import check_calibration

        if settings.task != "classification" or settings.mode == "lora":
            raise ValueError("--calibrate-head refits a classifier's linear head: use it with --task classification and --mode full, pruned or qat")
        check_calibration(settings.strategy, settings.rounds_mode, dp_sgd=settings.dp_noise_multiplier is not None)
    from fedge.schedule import check_schedule

    check_schedule(settings.lr_schedule)
    if settings.secure and settings.broker:
        raise ValueError("--secure starts its own Mosquitto with the generated config; leave out --broker")
    from fedge.modes import get_mode
    from fedge.rounds import codec_for

    try:
        get_mode(settings.mode, **settings.mode_options)
    except TypeError as exc:  # an option the mode does not take
        raise ValueError(f"--mode-options for mode {settings.mode}: {exc}") from None
    for spec in filter(None, (settings.codec, settings.downlink_codec)):
        codec_for(spec)  # CodecSpecError (a ValueError) names the valid stages
    from server.strategies import get_strategy

    get_strategy(settings.strategy, **settings.strategy_options)  # UsageError names the strategies or their options
    settings.watch()  # metrics port, dashboard address and token, tracking packages


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    cumulative, total = [], 0
    for r in rounds:
        total += r["uplink_bytes"]
        cumulative.append(total / 1e6)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    metric = next(iter(report["final"]))
    ax.plot(cumulative, [r[metric] for r in rounds], marker="o")
    ax.set_xlabel("cumulative uplink (MB)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{report['task']}: {report['clients']} sites, codec {report['codec']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_federation(
    settings: FederationSettings,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    report_path: Path | None = None,
) -> dict[str, Any]:
    import torch

    from edge_client.config import AgentConfig
    from edge_client.runner import run_agent
    from fedge import weights as W
    from fedge.broker import EmbeddedBroker
    from fedge.cli.options import profile_link_rates
    from fedge.models import build_model
    from fedge.protocol import TrainSettings
    from fedge.tasks.base import HEADLINE
    from server.config import ServerConfig
    from server.fedbuff import round_server

    _check(settings)
    link: dict[str, Any] = profile_link_rates(settings.emulate_link) if settings.emulate_link else {}
    # Every setting is checked before anything is deleted: a typo must not cost the last run's folder.
    train = TrainSettings(
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        mode=settings.mode,
        mode_options=settings.mode_options,
        dp_noise_multiplier=settings.dp_noise_multiplier,
        dp_max_grad_norm=settings.dp_max_grad_norm,
        dp_delta=settings.dp_delta,
        augment=settings.augment,
        logit_adjust=settings.logit_adjust,
        optimizer=settings.local_optimizer,
    )
    from server.config import check_strategy

    check_strategy(train, settings.strategy, settings.strategy_options, settings.rounds_mode, settings.codec)  # e.g. scaffold with DP-SGD or async rounds
    task = _evaluation_task(settings)  # fail fast, before any process starts
    model_options = dict(settings.model_options)
    if settings.dp_noise_multiplier is not None and settings.arch == "cnn":
        model_options.setdefault("norm", "group")  # DP-SGD cannot train BatchNorm (--dp-noise-multiplier's help says so)
    model_config = task.model_config(settings.arch, **model_options)
    if settings.dp_noise_multiplier is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in build_model(model_config).modules()):
        raise ValueError(f"DP-SGD cannot train the BatchNorm layers of {settings.arch!r}: use --arch cnn (built with GroupNorm under DP)")
    workdir = Path(settings.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)  # a demo starts fresh; `fedge server` is the command that resumes
    workdir.mkdir(parents=True)
    sites = [f"site-{i + 1}" for i in range(settings.clients)]
    keys = signing_keys(workdir / "keys", sites) if settings.signed and not settings.secure else {}
    tls: dict[str, dict[str, Any]] = {}

    started = time.monotonic()
    with ExitStack() as stack:
        if settings.secure:
            broker, keys, tls = _secure_broker(stack, workdir / "pki", settings.federation, sites)
        else:
            broker = settings.broker or stack.enter_context(EmbeddedBroker()).url
        server = round_server(
            ServerConfig(
                federation=settings.federation,
                broker=broker,
                model=model_config,
                checkpoint_dir=workdir / "checkpoints",
                rounds=settings.rounds,
                min_clients=settings.clients,
                expected_clients=tuple(sites),
                round_timeout=settings.round_timeout,
                uplink_codec=settings.codec,
                downlink_codec=settings.downlink_codec,
                train=train,
                lr_schedule=settings.lr_schedule,
                strategy=settings.strategy,
                strategy_options=settings.strategy_options,
                seed=settings.seed,
                wait_for_clients=120.0,
                init_checkpoint=settings.init,
                trusted_keys=keys.get("trusted"),
                signing_key=keys.get("server"),
                **tls.get("server", {}),
                dataset=settings.dataset,
                rounds_mode=settings.rounds_mode,
                buffer=settings.buffer,
                max_staleness=settings.max_staleness,
                calibrate_head=settings.calibrate_head,
            ),
            evaluator=task.evaluate,
            on_round=on_round,
        )
        ctx = mp.get_context("spawn")
        procs = []
        for i, site in enumerate(sites):
            config = AgentConfig(
                broker=broker,
                site=site,
                federation=settings.federation,
                dataset=settings.dataset,
                data_dir=Path(settings.data_dir) if settings.data_dir else None,
                task=settings.task,
                ct_dir=Path(settings.ct_dir) if settings.ct_dir else None,
                protocol=settings.protocols[i] if settings.protocols else None,
                image_size=settings.image_size,
                shard=i,
                num_shards=settings.clients,
                alpha=settings.alpha,
                seed=settings.seed,
                state_dir=workdir / "agents" / site,
                signing_key=keys.get(site),
                server_key=keys.get("server.pub"),
                **tls.get(site, {}),
                **link,
            )
            proc = ctx.Process(target=run_agent, args=(config,), name=site, daemon=True)
            proc.start()
            procs.append(proc)
        stack.callback(_reap, procs)
        torch.set_num_threads(1)
        from server.watch import watched

        with watched(server, settings.watch(), say=print):  # says only what was switched on: where to look
            state = server.run()
        for proc in procs:
            proc.join(timeout=60)
    history = state.history
    report = {
        "task": f"classification/{settings.dataset}" if settings.task == "classification" else settings.task,
        "dataset": settings.dataset,
        "clients": settings.clients,
        "codec": settings.codec,
        "mode": settings.mode,
        "emulated_link": link or None,
        "downlink_codec": settings.downlink_codec or "full fp32 snapshot",
        "seed": settings.seed,
        "rounds_mode": settings.rounds_mode if settings.rounds_mode == "sync" else f"async buffer {settings.buffer} max staleness {settings.max_staleness}",
        "rounds": [
            {
                k: r[k]
                for k in ("round", *HEADLINE[settings.task], "uplink_bytes", "downlink_bytes", "seconds", "dp_epsilon", "staleness", "head_calibration")
                if k in r
            }
            for r in history
        ],
        "strategy": {"name": settings.strategy, "options": settings.strategy_options},
        "final": {k: history[-1][k] for k in HEADLINE[settings.task]},
        "dense_update_bytes": W.dense_bytes(state.weights),
        "checkpoint": str(server.store.final_path.resolve()),
        "rejected_updates": sum(r["rejected"] for r in history),
        "seconds": round(time.monotonic() - started, 2),
    }
    report["uplink_transfer"] = _uplink_transfer(server.uploads, link)
    report["privacy"] = _privacy(server.uploads, history, settings)
    if report_path is not None:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2))
        _plot(report, report_path.with_suffix(".png"))
    return report


def _evaluation_task(settings: FederationSettings) -> Task:
    """What the server scores each global on: the dataset's test split, or (ldct) every site's held-out
    CT slices under its protocol (simulated here first, so the agents read them from the cache)."""
    if settings.task == "classification":
        from fedge.data import load_medmnist
        from fedge.tasks import ClassificationTask

        return ClassificationTask(load_medmnist(settings.dataset, settings.data_dir))
    from edge_client.ingest.ct import read_ct_dir
    from fedge.data.ldct import ScanProtocol, SimulationConfig, resolve_ct_dir
    from fedge.tasks.ldct import LdctTask

    series = read_ct_dir(resolve_ct_dir(settings.ct_dir, settings.data_dir))
    n, sim = settings.clients, SimulationConfig(image_size=settings.image_size or SimulationConfig.image_size)
    return LdctTask.pool([LdctTask.for_site(series, ScanProtocol.parse(p), shard=i, num_shards=n, sim=sim) for i, p in enumerate(settings.protocols)])


def _privacy(uploads: dict, history: list[dict[str, Any]], settings: FederationSettings) -> dict[str, Any]:
    """(epsilon, delta) spent: per site by DP-SGD (the latest its status reported) and by the server's DP-FedAvg."""
    sites: dict[str, float] = {}
    for (_, site), metrics in sorted(uploads.items()):
        if "dp_epsilon" in metrics:
            sites[site] = metrics["dp_epsilon"]
    record = {"sites_epsilon": sites, "delta": settings.dp_delta} if sites else None
    central = {"epsilon": history[-1]["dp_epsilon"], "delta": history[-1]["dp_delta"]} if history and "dp_epsilon" in history[-1] else None
    return {"record_level": record, "client_level_central": central}


def _uplink_transfer(uploads: dict, link: dict) -> dict[str, Any]:
    """Sites' measured upload time of one update beside the link's projection (bytes / bandwidth)."""
    if not uploads:
        return {}
    seconds = sum(m["upload_seconds"] for m in uploads.values()) / len(uploads)
    nbytes = sum(m["upload_bytes"] for m in uploads.values()) / len(uploads)
    result: dict[str, Any] = {"updates": len(uploads), "mean_bytes": nbytes, "measured_seconds": seconds}
    if link.get("uplink_mbps"):
        result["projected_seconds"] = nbytes * 8 / (link["uplink_mbps"] * 1e6)
        result["measured_over_projected"] = seconds / result["projected_seconds"]
    return result


def signing_keys(folder: Path, sites: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Fresh signing keys for a demo or a test: the server's (`server`, `server.pub`), one per site
    (by name), and the server's trusted-keys folder (`trusted`)."""
    from fedge.protocol.signing import Signer

    trusted = folder / "trusted"
    trusted.mkdir(parents=True)
    paths = {"trusted": trusted, "server": folder / "server.key", "server.pub": folder / "server.pub"}
    Signer.generate().save(paths["server"], paths["server.pub"])
    for site in sites:
        paths[site] = folder / f"{site}.key"
        Signer.generate().save(paths[site], trusted / f"{site}.pub")
    return paths


def _secure_broker(stack: ExitStack, folder: Path, federation: str, sites: list[str]) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """What `fedge provision init/site/broker` make, and Mosquitto running that config on a free
    loopback port: the broker URL, the signing keys and every identity's TLS files."""
    import getpass

    from fedge.broker import MosquittoProcess, free_port
    from server.provision import init_federation, provision_site, write_broker_config

    MosquittoProcess.binary()  # the clear error before any certificate is made
    port = free_port()
    url = f"mqtts://127.0.0.1:{port}"
    fed = init_federation(federation, folder)
    kits = {site: provision_site(fed.dir, site, broker=url) for site in sites}
    files = write_broker_config(fed.dir, folder / "broker", port=port, listen="127.0.0.1", user=getpass.getuser())
    stack.enter_context(MosquittoProcess(files.config, port, folder / "mosquitto.log"))
    keys = {"trusted": fed.trusted_keys, "server": fed.server_signing_key, "server.pub": fed.server_public_key}
    keys |= {site: kit.signing_key for site, kit in kits.items()}
    tls = {"server": {"ca": fed.server_ca, "cert": fed.server_cert, "key": fed.server_tls_key}}
    tls |= {site: {"ca": kit.ca, "cert": kit.cert, "key": kit.key} for site, kit in kits.items()}
    return url, keys, tls


def _reap(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=10)
    logging.getLogger(__name__).debug("agents stopped")
