"""`fedge agent`: the site agent. Run it directly with options, or from a config file."""

from __future__ import annotations

from pathlib import Path

import typer

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
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="Torch CPU threads for local training"),
    signing_key: Path = typer.Option(None, help="Ed25519 private key to sign updates"),
    server_key: Path = typer.Option(None, help="Server's Ed25519 public key: unsigned globals are then refused"),
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

    config = AgentConfig(
        broker=broker, site=site, federation=federation, data_dir=data_dir, dataset=dataset, shard=shard,
        num_shards=num_shards, alpha=alpha, state_dir=state_dir, codec=codec, seed=seed, threads=threads,
        signing_key=signing_key, server_key=server_key,
    )
    rounds = run_agent(config, logging.INFO if verbose else logging.WARNING)
    typer.echo(f"{site}: took part in rounds {rounds}")


@app.command("run")
def run(config: Path = typer.Option(..., help="Agent YAML written by `fedge agent init`")) -> None:
    """Run the agent from a config file (what the systemd unit calls)."""
    import logging

    from edge_client.config import AgentConfig
    from edge_client.runner import run_agent

    try:
        cfg = AgentConfig.from_yaml(config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run_agent(cfg, logging.INFO)
