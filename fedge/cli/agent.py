"""`fedge agent`: the site agent. Run it directly with options, or from a config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fedge.cli.options import fail, resolve_profile

app = typer.Typer(help="The site agent: trains on local images, sends only compressed deltas.", invoke_without_command=True)


@app.callback()
def agent(
    ctx: typer.Context,
    broker: str = typer.Option(None, help="MQTT broker URL, e.g. mqtt://broker.hospital.local:1883"),
    site: str = typer.Option(None, help="This site's name (unique in the federation)"),
    federation: str = typer.Option("demo"),
    data_dir: Path = typer.Option(None, envvar="FEDGE_DATA_DIR", help="A DICOM store (`fedge ingest`) or a folder with <dataset>.npz"),
    dataset: str = typer.Option("pneumoniamnist", help="MedMNIST subset name, when --data-dir holds npz files"),
    shard: int = typer.Option(None, help="Simulation: train on Dirichlet shard SHARD of NUM_SHARDS of the dataset"),
    num_shards: int = typer.Option(None),
    alpha: float = typer.Option(0.5, help="Dirichlet label skew for --shard"),
    state_dir: Path = typer.Option(Path("agent-state"), help="Residuals and the last update survive restarts here"),
    codec: str = typer.Option(None, help="Refuse rounds that ask for another uplink codec"),
    mode: str = typer.Option(
        None, help="Refuse rounds in another training mode (full, lora, pruned, qat): e.g. lora on a device short of memory; default: the server's"
    ),
    head_stats: bool = typer.Option(
        True,
        "--head-stats/--no-head-stats",
        help="Answer a server's head-calibration round (`fedge server --calibrate-head`) with this site's class counts and class feature sums; --no-head-stats: refuse it",
    ),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="Torch CPU threads for local training"),
    device: str = typer.Option("auto", help="Training device: auto (CUDA when present), cpu, cuda, cuda:N"),
    emulate_link: str = typer.Option(None, help="Pace MQTT traffic to this device profile's uplink/downlink (name or YAML)"),
    signing_key: Path = typer.Option(None, help="Ed25519 private key to sign updates"),
    server_key: Path = typer.Option(None, help="Server's Ed25519 public key: unsigned announcements, globals and control are then refused"),
    ca: Path = typer.Option(None, help="Federation CA certificate (from the site's `fedge provision site` kit)"),
    cert: Path = typer.Option(None, help="This site's client certificate; its identity becomes the MQTT client id"),
    key: Path = typer.Option(None, help="Private key of --cert"),
    metrics_port: int = typer.Option(None, min=0, max=65535, help="Serve this agent's Prometheus metrics on http://METRICS_HOST:PORT/metrics"),
    metrics_host: str = typer.Option("127.0.0.1", help="Address the metrics endpoint listens on (0.0.0.0: every interface)"),
    verbose: bool = typer.Option(True, "--verbose/--quiet"),
) -> None:
    """Join a federation and train each round until the server finishes it."""
    if ctx.invoked_subcommand is not None:
        return
    if not broker or not site:
        raise typer.BadParameter("--broker and --site are required (or use `fedge agent run --config FILE`)")
    import logging

    from edge_client.config import AgentConfig
    from edge_client.runner import run_agent
    from fedge.cli.options import profile_link_rates

    link: dict[str, Any] = profile_link_rates(emulate_link) if emulate_link else {}
    try:
        config = AgentConfig(
            broker=broker,
            site=site,
            federation=federation,
            data_dir=data_dir,
            dataset=dataset,
            shard=shard,
            num_shards=num_shards,
            alpha=alpha,
            state_dir=state_dir,
            codec=codec,
            mode=mode,  # type: ignore[arg-type]  # pydantic validates the choice
            head_stats=head_stats,
            seed=seed,
            threads=threads,
            signing_key=signing_key,
            server_key=server_key,
            device=device,
            ca=ca,
            cert=cert,
            key=key,
            **link,
        )
    except ValueError as exc:  # pydantic's ValidationError names the field and the allowed values
        raise fail(f"invalid agent settings: {exc}") from None
    level = logging.INFO if verbose else logging.WARNING
    if metrics_port is not None:
        from edge_client.metrics import run_agent_with_metrics

        rounds = run_agent_with_metrics(config, metrics_port, metrics_host, level)
    else:
        rounds = run_agent(config, level)
    typer.echo(f"{site}: took part in rounds {rounds}")


@app.command("run")
def run(
    config: Path = typer.Option(..., help="Agent YAML written by `fedge agent init`"),
    metrics_port: int = typer.Option(None, min=0, max=65535, help="Serve this agent's Prometheus metrics on http://METRICS_HOST:PORT/metrics"),
    metrics_host: str = typer.Option("127.0.0.1", help="Address the metrics endpoint listens on (0.0.0.0: every interface)"),
) -> None:
    """Run the agent from a config file (what the systemd unit calls)."""
    import logging

    from edge_client.config import AgentConfig
    from edge_client.runner import run_agent

    try:
        cfg = AgentConfig.from_yaml(config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if metrics_port is not None:
        from edge_client.metrics import run_agent_with_metrics

        run_agent_with_metrics(cfg, metrics_port, metrics_host, logging.INFO)
    else:
        run_agent(cfg, logging.INFO)


# ---- installing the agent on a device: `fedge agent init` and `fedge agent install-service` ----------
# Exit codes: 0 written; 2 usage error (bad option, invalid config, file exists); 3 profile not found or invalid.


@app.command("init")
def init(
    broker: str = typer.Option(..., help="MQTT broker URL, e.g. mqtts://broker.hospital.local:8883"),
    site: str = typer.Option(..., help="This site's name (unique in the federation)"),
    data_dir: Path = typer.Option(..., help="The site's DICOM store (`fedge ingest`) or a folder with <dataset>.npz"),
    profile: str = typer.Option("detect", help="Device profile: a shipped name, a path to your YAML, or `detect` (this host)"),
    out: Path = typer.Option(Path("agent.yaml"), help="Where to write the agent config"),
    federation: str = typer.Option("demo"),
    dataset: str = typer.Option("pneumoniamnist", help="MedMNIST subset name, when --data-dir holds npz files"),
    state_dir: Path = typer.Option(None, help="Residuals and the last update survive restarts here (default: agent-state/ beside --out)"),
    emulate_link: bool = typer.Option(False, "--emulate-link", help="Throttle MQTT traffic to the profile's uplink/downlink (testing only)"),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists"),
) -> None:
    """Write an agent config whose defaults (codec, chunk size, link rates) come from a device profile."""
    from pydantic import ValidationError

    from edge_client.config import AgentConfig
    from fedge.files import atomic_write_bytes
    from fedge.transport import BrokerURL

    out = out.absolute()
    if out.exists() and not force:
        raise fail(f"{out} exists; pass --force to overwrite it")
    prof, detected = resolve_profile(profile)
    try:
        url = BrokerURL.parse(broker)
    except ValueError as exc:
        raise fail(str(exc)) from None
    link = prof.link
    if emulate_link and link.uplink_mbps is None and link.downlink_mbps is None:
        raise fail(f"profile {prof.name} has no uplink_mbps or downlink_mbps figure: --emulate-link has nothing to emulate")
    data_dir = data_dir.expanduser().absolute()
    try:
        config = AgentConfig(
            broker=broker, site=site, federation=federation, dataset=dataset, data_dir=data_dir,
            state_dir=(state_dir or out.parent / "agent-state").expanduser().absolute(),
            codec=prof.defaults.codec, chunk_size=prof.defaults.chunk_size,
            uplink_mbps=link.uplink_mbps if emulate_link else None, downlink_mbps=link.downlink_mbps if emulate_link else None,
        )  # fmt: skip
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise fail(f"invalid agent config: {problems}") from None
    origin = f"detected on this host: {detected.found}" if detected else "chosen with --profile"
    header = [
        f"# fedge agent config, written by `fedge agent init` from device profile {prof.name} ({origin}).",
        "# codec and chunk_size are the profile's defaults; the agent refuses rounds that announce another codec.",
    ]
    if emulate_link:
        header.append("# uplink_mbps/downlink_mbps emulate the profile's site link (--emulate-link): for tests, not production.")
    header.append(f"# Run it: fedge agent run --config {out}")
    atomic_write_bytes(out, ("\n".join(header) + "\n" + config.to_yaml()).encode())
    if url.password:
        out.chmod(0o600)  # the broker password is in the URL
    typer.echo(f"wrote {out} (profile {prof.name}, codec {config.codec}, chunk {config.chunk_size} B)")
    if emulate_link:
        for direction, value in (("uplink", config.uplink_mbps), ("downlink", config.downlink_mbps)):
            typer.echo(f"  {direction}: {'unthrottled (profile has no figure)' if value is None else f'{value:g} Mbit/s emulated'}")
    if not data_dir.exists():
        typer.echo(f"warning: --data-dir {data_dir} does not exist yet; ingest images into it before starting the agent", err=True)


@app.command("install-service")
def install_service(
    config: Path = typer.Option(Path("agent.yaml"), help="Agent YAML written by `fedge agent init`"),
    user: str = typer.Option("fedge", help="Unprivileged account the agent runs as"),
    out: Path = typer.Option(Path("fedge-agent.service"), help="Where to write the systemd unit"),
    fedge: Path = typer.Option(None, help="Absolute path of the fedge executable (default: this installation's)"),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists"),
) -> None:
    """Write a systemd unit that runs `fedge agent run --config CONFIG` (restart on failure, unprivileged user)."""
    from edge_client.config import AgentConfig
    from edge_client.service import UNIT_NAME, ServiceError, fedge_executable, render_unit
    from fedge.files import atomic_write_bytes

    config = config.expanduser().absolute()
    if out.exists() and not force:
        raise fail(f"{out} exists; pass --force to overwrite it")
    try:
        cfg = AgentConfig.from_yaml(config)
    except ValueError as exc:
        raise fail(f"{exc} (write one with `fedge agent init`)") from None
    state = cfg.state_dir if cfg.state_dir.is_absolute() else config.parent / cfg.state_dir
    try:
        executable = (fedge or fedge_executable()).expanduser()
        unit = render_unit(config, user=user, site=cfg.site, federation=cfg.federation, fedge=executable, state_dir=state)
    except ServiceError as exc:
        raise fail(str(exc), exc.exit_code) from None
    atomic_write_bytes(out, unit.encode())
    typer.echo(f"wrote {out}")
    for path in (cfg.data_dir, cfg.state_dir):
        if path is not None and not path.is_absolute():
            typer.echo(f"note: {path} is relative: the service resolves it against {config.parent}", err=True)
    typer.echo(
        "install it:\n"
        f"  id {user} || sudo useradd --system --create-home --shell /usr/sbin/nologin {user}\n"
        f"  sudo mkdir -p {state} && sudo chown -R {user}: {state}   # the agent writes its state here\n"
        f"  sudo chgrp {user} {config} && sudo chmod g+r {config}\n"
        f"  sudo cp {out} /etc/systemd/system/{UNIT_NAME}\n"
        "  sudo systemctl daemon-reload && sudo systemctl enable --now fedge-agent\n"
        "  journalctl -u fedge-agent -f\n"
        f"On a Jetson, the GPU needs the video group: sudo usermod -aG video {user}"
    )
