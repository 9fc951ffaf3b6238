"""`fedge server`: the aggregation server for one federation; resumes from its last checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedge.cli.options import (
    AUGMENT_HELP,
    CALIBRATE_HEAD_HELP,
    DP_HELP,
    FILM_HELP,
    IMAGE_SIZE_HELP,
    LOCAL_OPTIMIZER_HELP,
    LOGIT_ADJUST_HELP,
    LR_SCHEDULE_HELP,
    MODE_OPTIONS_HELP,
    STRATEGY_HELP,
    STRATEGY_OPTIONS_HELP,
    one_line_errors,
)

if TYPE_CHECKING:
    from fedge.models import ModelConfig


@one_line_errors
def server(
    broker: str = typer.Option(None, help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883; default: start an embedded broker"),
    federation: str = typer.Option("demo", help="Federation name (topic prefix fedge/<name>/)"),
    task: str = typer.Option(
        "classification",
        help="What the sites learn: classification (MedMNIST) | ldct (low-dose CT denoising; agents set task, ct_dir and protocol in their YAML)",
    ),
    dataset: str = typer.Option("pneumoniamnist", help="Dataset that fixes the model's input/classes (and evaluation with --evaluate)"),
    data_dir: str = typer.Option(
        None, envvar="FEDGE_DATA_DIR", help="Folder holding <dataset>.npz (ldct: the data root whose ct/ge_head_human_28slice --ct-dir defaults to)"
    ),
    ct_dir: str = typer.Option(
        None, help="ldct: the server's own CT DICOM series; each global is scored (PSNR/SSIM) on all of its slices (implies --evaluate)"
    ),
    protocol: list[str] = typer.Option(
        None,
        help="ldct: scan protocol(s) I0:VIEWS[:NOISE] the evaluation simulates on --ct-dir (repeat the flag; default: the four of `fedge demo`, 1e5:360 to 5e3:90:5)",
    ),
    image_size: int = typer.Option(None, min=16, max=1024, help=IMAGE_SIZE_HELP),
    film: bool = typer.Option(False, "--film", help=FILM_HELP),
    init: Path = typer.Option(None, help="Start from this checkpoint (e.g. a pretrained backbone) instead of --arch"),
    arch: str = typer.Option(None, help="Architecture from the zoo, when no --init; default: the task's (cnn, redcnn)"),
    rounds: int = typer.Option(10, min=1),
    min_clients: int = typer.Option(2, min=1, help="Quorum: aggregate at the deadline once this many updates arrived"),
    clients: str = typer.Option(None, help="Comma-separated site names to wait for each round (default: whoever is online)"),
    codec: str = typer.Option("fp32", help="Uplink codec spec the agents must use"),
    mode: str = typer.Option("full", help="Local training mode the agents run: full | lora | pruned | qat"),
    mode_options: str = typer.Option(None, help=MODE_OPTIONS_HELP),
    downlink_codec: str = typer.Option(None, help="Send each new global as a delta with this codec (default: full model)"),
    round_timeout: float = typer.Option(300.0, help="Seconds a round waits for all selected sites"),
    epochs: int = typer.Option(1),
    lr: float = typer.Option(1e-3, help="Local learning rate, announced each round (scaled by --lr-schedule)"),
    local_optimizer: str = typer.Option("adam", "--local-optimizer", help=LOCAL_OPTIMIZER_HELP),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    checkpoint_dir: Path = typer.Option(Path("runs/server"), help="Per-round checkpoints; a restart resumes from here"),
    evaluate: bool = typer.Option(False, help="Score each global on the dataset's test split (needs --data-dir); ldct: on --ct-dir"),
    trusted_keys: Path = typer.Option(None, help="Folder of <site>.pub Ed25519 keys; unsigned updates are then rejected"),
    signing_key: Path = typer.Option(None, help="Server Ed25519 private key: signs globals, announcements, snapshots and control"),
    ca: Path = typer.Option(None, help="Federation CA certificate (`fedge provision init`): the broker's TLS certificate must chain to it"),
    cert: Path = typer.Option(None, help="The server's client certificate; its identity becomes the MQTT client id"),
    key: Path = typer.Option(None, help="Private key of --cert"),
    max_samples: int = typer.Option(1_000_000, min=1, help="Refuse updates claiming more training samples (their FedAvg weight)"),
    max_update_norm: float = typer.Option(1e4, help="Refuse updates whose decoded delta has a larger L2 norm (NaN/Inf always refused)"),
    strategy: str = typer.Option("fedavg", help=STRATEGY_HELP),
    strategy_options: str = typer.Option(None, help=STRATEGY_OPTIONS_HELP),
    lr_schedule: str = typer.Option("constant", help=LR_SCHEDULE_HELP),
    augment: bool = typer.Option(False, "--augment", help=AUGMENT_HELP),
    logit_adjust: float = typer.Option(0.0, "--logit-adjust", min=0.0, max=10.0, help=LOGIT_ADJUST_HELP),
    calibrate_head: bool = typer.Option(False, "--calibrate-head", help=CALIBRATE_HEAD_HELP),
    dp_noise_multiplier: float = typer.Option(None, help=DP_HELP),
    dp_max_grad_norm: float = typer.Option(1.0, help="DP-SGD: per-sample gradient clip"),
    dp_delta: float = typer.Option(1e-5, help="DP-SGD: the delta each site's epsilon is reported at (below 1 / its records)"),
    metrics_port: int = typer.Option(None, min=0, max=65535, help="Serve Prometheus metrics on http://METRICS_HOST:PORT/metrics"),
    metrics_host: str = typer.Option("127.0.0.1", help="Address the metrics endpoint listens on (0.0.0.0: every interface, for a remote Prometheus)"),
    dashboard: str = typer.Option(None, help="Serve the read-only live dashboard on HOST:PORT or PORT (host 127.0.0.1)"),
    dashboard_token: str = typer.Option(
        None, envvar="FEDGE_DASHBOARD_TOKEN", help="Bearer token the dashboard requires for its data (open the page as http://HOST:PORT/#token=TOKEN)"
    ),
    mlflow: str = typer.Option(
        None, help="Log each round's numbers and the final model to MLflow: a tracking URL or a folder (file store); needs fedge[tracking]"
    ),
    tensorboard: Path = typer.Option(None, help="Write each round's numbers as TensorBoard event files under this folder; needs fedge[tracking]"),
    decode_workers: int = typer.Option(
        0, min=0, max=256, help="Processes that decode and check updates beside the round loop (0: in it); for hundreds of sites"
    ),
    rounds_mode: str = typer.Option(
        "sync",
        help="sync: each round waits for its selected sites (or the deadline's quorum); async: FedBuff, an aggregate every --buffer updates, each trained from one of the last --max-staleness + 1 versions and weighted 1/sqrt(1 + staleness)",
    ),
    buffer: int = typer.Option(2, min=1, max=100_000, help="--rounds-mode async: accepted updates per aggregate (FedBuff's K)"),
    max_staleness: int = typer.Option(
        4, min=0, max=1000, help="--rounds-mode async: the oldest version whose updates still count, in versions behind the open one"
    ),
    linger: float = typer.Option(
        0.0, min=0, max=86400, help="After the last round, keep the dashboard and metrics up this many seconds (a last scrape, open pages)"
    ),
    verbose: bool = typer.Option(True, "--verbose/--quiet"),
) -> None:
    """Aggregate rounds of site updates over MQTT (FedAvg or --strategy), checkpoint each round, resume after a crash.

    Known errors (a bad setting, a missing file, an unreachable broker) end it with one line and
    their exit code (`fedge --help`)."""
    import logging
    from contextlib import ExitStack

    from rich.console import Console

    from compression import UpdateCodec
    from fedge.broker import EmbeddedBroker
    from fedge.checkpoint import load_checkpoint
    from fedge.cli.options import fail, parse_mode_options, parse_strategy_options
    from fedge.data import load_medmnist
    from fedge.protocol import TrainSettings
    from fedge.schedule import LR_SCHEDULES
    from fedge.tasks import ClassificationTask
    from fedge.tasks.base import DEFAULT_ARCH, TASK_NAMES, check_task_arch
    from server.config import ServerConfig, check_calibration
    from server.fedbuff import round_server as make_round_server
    from server.strategies import get_strategy
    from server.watch import WatchSettings, watched

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train = TrainSettings(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            mode=mode,  # type: ignore[arg-type]
            mode_options=parse_mode_options(mode_options),
            dp_noise_multiplier=dp_noise_multiplier,
            dp_max_grad_norm=dp_max_grad_norm,
            dp_delta=dp_delta,
            augment=augment,
            logit_adjust=logit_adjust,
            optimizer=local_optimizer,  # type: ignore[arg-type]  # checked here: TrainSettings names the choices
        )
    except ValueError as exc:
        raise fail(f"invalid training settings: {exc}") from None
    if cert is not None and (key is None or ca is None):
        raise fail("--cert needs --key and --ca (the files `fedge provision init` wrote for the server)")
    for spec in filter(None, (codec, downlink_codec)):
        UpdateCodec.from_spec(spec)  # a typo fails here, before a broker starts or a dataset loads
    get_strategy(strategy, **parse_strategy_options(strategy_options))  # so does a wrong strategy or option
    if calibrate_head:  # and a calibration round the strategy or the rounds cannot have
        check_calibration(strategy, rounds_mode, dp_sgd=dp_noise_multiplier is not None)
    if lr_schedule not in LR_SCHEDULES:
        raise fail(f"--lr-schedule {lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if rounds_mode not in ("sync", "async"):
        raise fail(f"--rounds-mode {rounds_mode!r}: choose sync or async")
    watch = WatchSettings(metrics_port=metrics_port, metrics_host=metrics_host, dashboard=dashboard, dashboard_token=dashboard_token,
                          mlflow=mlflow, tensorboard=tensorboard, linger=linger)  # fmt: skip
    if task not in TASK_NAMES:
        raise fail(f"--task {task!r}: choose one of {', '.join(TASK_NAMES)}")
    arch = arch or DEFAULT_ARCH[task]
    check_task_arch(task, arch)
    console = Console()
    classifier = None
    if task == "ldct":
        if augment or logit_adjust:
            from fedge.tasks.ldct import NO_AUGMENT, NO_LOGIT_ADJUST

            raise fail(NO_AUGMENT if augment else NO_LOGIT_ADJUST)
        model_config, evaluator = _denoiser(
            ct_dir, data_dir, protocol, image_size, film=film, arch=arch, evaluate=evaluate or ct_dir is not None, dp=dp_noise_multiplier is not None, seed=seed
        )
        if init is not None:
            model_config = load_checkpoint(init).config
    else:
        if ct_dir or protocol or image_size or film:
            raise fail("--ct-dir, --protocol, --image-size and --film are options of the ldct task: add --task ldct")
        if init is not None and data_dir is None:
            model_config = load_checkpoint(init).config
        else:
            classifier = ClassificationTask(load_medmnist(dataset, data_dir))
            model_config = classifier.model_config(arch, **({"norm": "group"} if dp_noise_multiplier is not None and arch == "cnn" else {}))
        evaluator = (classifier or ClassificationTask(load_medmnist(dataset, data_dir))).evaluate if evaluate else None

    with ExitStack() as stack:
        if broker is None:
            broker = stack.enter_context(EmbeddedBroker()).url
            console.print(f"embedded broker on {broker} (agents: --broker {broker})")
        config = ServerConfig(
            federation=federation,
            broker=broker,
            model=model_config,
            checkpoint_dir=checkpoint_dir,
            rounds=rounds,
            min_clients=min_clients,
            expected_clients=tuple(c for c in (clients or "").split(",") if c),
            round_timeout=round_timeout,
            uplink_codec=codec,
            downlink_codec=downlink_codec,
            train=train,
            lr_schedule=lr_schedule,  # type: ignore[arg-type]  # checked in ServerConfig
            seed=seed,
            init_checkpoint=init,
            dataset=dataset if classifier is not None else None,
            trusted_keys=trusted_keys,
            signing_key=signing_key,
            ca=ca,
            cert=cert,
            key=key,
            max_samples=max_samples,
            max_update_norm=max_update_norm,
            strategy=strategy,
            strategy_options=parse_strategy_options(strategy_options),
            decode_workers=decode_workers,
            rounds_mode=rounds_mode,  # type: ignore[arg-type]
            buffer=buffer,
            max_staleness=max_staleness,
            calibrate_head=calibrate_head,
        )
        round_server = make_round_server(config, evaluator=evaluator, on_round=lambda r: console.print(r))
        with watched(round_server, watch, say=console.print):
            state = round_server.run()
    console.print(f"federation {federation} finished after round {state.round}; model: {checkpoint_dir / 'final.safetensors'}")


def _denoiser(
    ct_dir: str | None,
    data_dir: str | None,
    protocols: Sequence[str] | None,
    image_size: int | None,
    *,
    film: bool,
    arch: str,
    evaluate: bool,
    dp: bool,
    seed: int,
) -> tuple[ModelConfig, Callable | None]:
    """The ldct denoiser's config and, when evaluating, its scorer on the server's own CT: every slice of
    --ct-dir under each --protocol (a real server holds no site's slices, unlike the demo's evaluator)."""
    from fedge.data.ldct import SITE_PROTOCOLS, ScanProtocol, SimulationConfig, resolve_ct_dir
    from fedge.errors import UsageError
    from fedge.tasks.ldct import COND, NO_DP, LdctTask, denoiser_config

    if dp:
        raise UsageError(NO_DP)
    parsed = [ScanProtocol.parse(p) for p in protocols or SITE_PROTOCOLS[:4]]  # a typo fails before any CT is read
    sim = SimulationConfig(image_size=image_size or SimulationConfig.image_size)
    config = denoiser_config(sim.image_size, arch, **({"cond": COND} if film else {}))
    if not evaluate:
        if protocols:
            raise UsageError("--protocol sets what the evaluation simulates: add --ct-dir DIR (or --evaluate, for the data root's head CT)")
        return config, None
    from edge_client.ingest.ct import read_ct_dir

    return config, LdctTask.scoring(read_ct_dir(resolve_ct_dir(ct_dir, data_dir)), parsed, sim=sim, seed=seed).evaluate
