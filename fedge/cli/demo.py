"""`fedge demo`: a whole federation on this machine, with a live per-round table."""

from __future__ import annotations

from pathlib import Path

import typer

from fedge.cli import options as helps


def demo(
    task: str = typer.Option("classification", help="What the sites learn: classification (MedMNIST) | ldct (low-dose CT denoising from real CT)"),
    dataset: str = typer.Option("pneumoniamnist", help="MedMNIST subset: <name>.npz in --data-dir, else downloaded"),
    data_dir: str = typer.Option(None, envvar="FEDGE_DATA_DIR", help="Folder holding <dataset>.npz (or medmnist/<dataset>.npz)"),
    ct_dir: str = typer.Option(None, help="ldct: folder of CT DICOM series the sites share out (default: ct/ge_head_human_28slice in the data folder)"),
    protocol: list[str] = typer.Option(
        None,
        help="ldct: one scan protocol per site, I0:VIEWS[:ELECTRONIC_NOISE] (repeat the flag; default: fedge.data.ldct.SITE_PROTOCOLS, from 1e5:360 down to 5e3:90:5)",
    ),
    film: bool = typer.Option(False, "--film", help=helps.FILM_HELP),
    image_size: int = typer.Option(None, min=16, max=1024, help=helps.IMAGE_SIZE_HELP),
    clients: int = typer.Option(4, min=1, help="Number of hospital sites (agent processes)"),
    rounds: int = typer.Option(10, min=1, help="Federated rounds"),
    codec: str = typer.Option("fp32", help="Uplink codec spec, e.g. 'fp16' or 'topk:0.01,ef|q8|zstd:3'"),
    downlink_codec: str = typer.Option(None, help="Downlink delta codec spec, e.g. 'q8,ef|zstd'; default sends the full model"),
    arch: str = typer.Option(None, help="Model architecture from the zoo (cnn, resnet, vit; redcnn for ldct); default: the task's (cnn, redcnn)"),
    broker: str = typer.Option(None, help="MQTT broker URL (mqtt://host:port); default: embedded amqtt on 127.0.0.1"),
    seed: int = typer.Option(0, help="Seed for the site split, initial model and local training"),
    alpha: float = typer.Option(1.0, help="Dirichlet label-skew of the site split (smaller = more skewed)"),
    epochs: int = typer.Option(1, min=1, help="Local epochs per round"),
    lr: float = typer.Option(1e-3, help="Local learning rate (Adam; with --local-optimizer sgd about 0.2)"),
    local_optimizer: str = typer.Option("adam", "--local-optimizer", help=helps.LOCAL_OPTIMIZER_HELP),
    mode: str = typer.Option("full", help="Local training mode: full | lora | pruned | qat"),
    mode_options: str = typer.Option(None, help=helps.MODE_OPTIONS_HELP),
    strategy: str = typer.Option("fedavg", help=helps.STRATEGY_HELP),
    strategy_options: str = typer.Option(None, help=helps.STRATEGY_OPTIONS_HELP),
    lr_schedule: str = typer.Option("constant", help=helps.LR_SCHEDULE_HELP),
    augment: bool = typer.Option(False, "--augment", help=helps.AUGMENT_HELP),
    logit_adjust: float = typer.Option(0.0, "--logit-adjust", min=0.0, max=10.0, help=helps.LOGIT_ADJUST_HELP),
    calibrate_head: bool = typer.Option(False, "--calibrate-head", help=helps.CALIBRATE_HEAD_HELP),
    dp_noise_multiplier: float = typer.Option(None, help=helps.DP_HELP),
    dp_max_grad_norm: float = typer.Option(1.0, help="DP-SGD: per-sample gradient clip"),
    dp_delta: float = typer.Option(1e-5, help="DP-SGD: the delta each site's epsilon is reported at"),
    init: Path = typer.Option(None, help="Pretrained checkpoint to federate from (`fedge pretrain`)"),
    emulate_link: str = typer.Option(None, help="Device profile (name or YAML path) whose uplink/downlink paces each agent"),
    rounds_mode: str = typer.Option(
        "sync", help="sync (the default) | async: FedBuff, an aggregate every --buffer updates weighted by staleness (`fedge server --help`)"
    ),
    buffer: int = typer.Option(2, min=1, help="--rounds-mode async: accepted updates per aggregate (FedBuff's K)"),
    max_staleness: int = typer.Option(4, min=0, max=1000, help="--rounds-mode async: how many versions behind an update may be and still count"),
    secure: bool = typer.Option(
        False,
        "--secure",
        help="Provision a CA, certificates and ACLs (as `fedge provision` does) into WORKDIR/pki and run the demo over a Mosquitto started with them (needs mosquitto)",
    ),
    workdir: Path = typer.Option(Path("runs/demo"), help="Where checkpoints and agent state go (wiped first)"),
    report: Path = typer.Option(None, help="Write the JSON report here (and a PNG plot beside it)"),
    metrics_port: int = typer.Option(None, min=0, max=65535, help="Serve the server's Prometheus metrics on http://127.0.0.1:PORT/metrics"),
    dashboard: str = typer.Option(None, help="Serve the read-only live dashboard on HOST:PORT or PORT (host 127.0.0.1)"),
    dashboard_token: str = typer.Option(
        None, envvar="FEDGE_DASHBOARD_TOKEN", help="Bearer token the dashboard requires for its data (open http://HOST:PORT/#token=TOKEN)"
    ),
    mlflow: str = typer.Option(None, help="Log each round and the final model to MLflow: a tracking URL or a folder (file store); needs fedge[tracking]"),
    tensorboard: Path = typer.Option(None, help="Write each round's numbers as TensorBoard event files under this folder; needs fedge[tracking]"),
    linger: float = typer.Option(0.0, min=0, max=86400, help="After the last round, keep the dashboard and metrics up this many seconds"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log server events"),
) -> None:
    """Run a federation on one machine: embedded broker, aggregation server and N site agents."""
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fedge.cli.federation import FederationSettings, run_federation
    from fedge.cli.options import fail_with, parse_mode_options, parse_strategy_options
    from fedge.tasks.base import DEFAULT_ARCH, HEADLINE, TASK_NAMES

    if task not in TASK_NAMES:
        raise fail_with(ValueError(f"--task {task!r}: choose one of {', '.join(TASK_NAMES)}"))
    headline = HEADLINE[task]
    if task == "ldct":
        from fedge.data.ldct import SITE_PROTOCOLS

        protocols = tuple(protocol or SITE_PROTOCOLS[:clients])
    else:
        protocols = ()
    model_options = {"cond": 2} if film else {}
    if film and task != "ldct":
        raise fail_with(ValueError("--film conditions the ldct denoiser on the scan protocol; it needs --task ldct"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    table = Table(title=f"fedge demo: {dataset if task == 'classification' else 'ldct'}, {clients} sites, mode {mode}, codec {codec}")
    for col in ("round", *headline, "uplink bytes", "downlink bytes", "seconds"):
        table.add_column(col, justify="right")
    try:
        settings = FederationSettings(
            task=task,  # type: ignore[arg-type]
            ct_dir=ct_dir,
            protocols=protocols,
            model_options=model_options,
            image_size=image_size,
            dataset=dataset,
            data_dir=data_dir,
            clients=clients,
            rounds=rounds,
            codec=codec,
            downlink_codec=downlink_codec,
            arch=arch or DEFAULT_ARCH[task],
            broker=broker,
            seed=seed,
            alpha=alpha,
            epochs=epochs,
            lr=lr,
            workdir=workdir,
            mode=mode,  # type: ignore[arg-type]
            mode_options=parse_mode_options(mode_options),
            init=init,
            emulate_link=emulate_link,
            secure=secure,
            strategy=strategy,
            strategy_options=parse_strategy_options(strategy_options),
            augment=augment,
            logit_adjust=logit_adjust,
            calibrate_head=calibrate_head,
            local_optimizer=local_optimizer,  # type: ignore[arg-type]  # checked before anything starts
            lr_schedule=lr_schedule,  # type: ignore[arg-type]  # checked before anything starts
            dp_noise_multiplier=dp_noise_multiplier,
            dp_max_grad_norm=dp_max_grad_norm,
            dp_delta=dp_delta,
            metrics_port=metrics_port,
            dashboard=dashboard,
            dashboard_token=dashboard_token,
            mlflow=mlflow,
            tensorboard=tensorboard,
            linger=linger,
            rounds_mode=rounds_mode,  # type: ignore[arg-type]
            buffer=buffer,
            max_staleness=max_staleness,
        )
        settings.watch()  # a bad --dashboard, token or tracking option fails before anything starts
    except ValueError as exc:
        raise fail_with(exc) from None
    with Progress(TextColumn("[bold]rounds"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("rounds", total=rounds + int(calibrate_head))

        def on_round(record: dict) -> None:
            scores = "  ".join(f"{k} {record[k]:.4f}" for k in headline)
            label = f"{record['round']} (LDA head)" if record.get("head_calibration") else str(record["round"])  # the calibration round
            progress.console.print(
                f"round {label:>3}  {scores}  up {record['uplink_bytes']:>10,d} B  down {record['downlink_bytes']:>10,d} B  {record['seconds']:.1f}s"
            )
            table.add_row(
                label,
                *[f"{record[k]:.4f}" for k in headline],
                f"{record['uplink_bytes']:,}",
                f"{record['downlink_bytes']:,}",
                f"{record['seconds']:.1f}",
            )
            progress.advance(bar)

        try:
            result = run_federation(settings, on_round=on_round, report_path=report)
        except (FileNotFoundError, ValueError, ConnectionError, TimeoutError, RuntimeError) as exc:  # ProfileError, ProvisionError are ValueErrors
            raise fail_with(exc) from None
    console.print(table)
    final = ", ".join(f"{k} {v:.4f}" for k, v in result["final"].items())
    console.print(f"final {final} in {result['seconds']:.0f}s; model: {result['checkpoint']}")
    privacy = result["privacy"]
    if privacy["record_level"]:
        worst = max(privacy["record_level"]["sites_epsilon"].values())
        console.print(f"DP-SGD: every site spent epsilon <= {worst:.2f} at delta {privacy['record_level']['delta']:g}")
    if privacy["client_level_central"]:
        console.print(f"DP-FedAvg: epsilon {privacy['client_level_central']['epsilon']:.2f} at delta {privacy['client_level_central']['delta']:g}")
    if report:
        console.print(f"report: {report} (plot: {Path(report).with_suffix('.png')})")
