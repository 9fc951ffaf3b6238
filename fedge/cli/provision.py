"""`fedge provision`: a federation CA, certificates, site kits and the broker's TLS + ACL config."""

from __future__ import annotations

from pathlib import Path

import typer

from fedge.cli.options import fail

app = typer.Typer(
    help=(
        "Certificates and keys for a secure federation, in three steps: `fedge provision init` (CA, broker "
        "and server identities), `fedge provision site NAME` (one kit folder per site), `fedge provision broker` "
        "(Mosquitto config with mutual TLS and per-identity ACLs)."
    ),
    no_args_is_help=True,
)


@app.command("init")
def init(
    federation: str = typer.Option(..., help="Federation name (topic prefix fedge/<name>/); every kit is bound to it"),
    out: Path = typer.Option(..., help="Provision folder to create; holds the CA key: keep it off the broker and the sites"),
    host: list[str] = typer.Option([], help="Broker DNS name or IP the certificate must hold (besides localhost, 127.0.0.1); repeatable"),
    force: bool = typer.Option(False, help="Replace an existing CA (every kit issued from it stops working)"),
) -> None:
    """Step 1: create the federation CA, the broker and server certificates, the server's signing key.

    OUT/ca holds the CA key (keep it offline); OUT/server holds what `fedge server` needs (--ca, --cert, --key, --signing-key, --trusted-keys).

    Next: `fedge provision site NAME --dir OUT`, once per site.
    """
    from server.provision import ProvisionError, init_federation

    try:
        fed = init_federation(federation, out, hosts=host, force=force)
    except ProvisionError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"federation {fed.name}: CA in {fed.ca_cert.parent} (keep ca.key offline), server identity in {fed.server_dir}")
    typer.echo(f"next: fedge provision site NAME --dir {fed.dir}   (one per site), then fedge provision broker --dir {fed.dir} --out BROKER_DIR")


@app.command("site")
def site(
    name: str = typer.Argument(..., help="Site name: its certificate identity, MQTT client id and topic level"),
    dir: Path = typer.Option(..., "--dir", help="Provision folder made by `fedge provision init`"),
    broker: str = typer.Option(None, help="Broker URL written into the kit's agent.yaml (default: mqtts://<first --host of init>:8883)"),
    max_samples: int = typer.Option(None, min=1, help="Most training samples this site may claim per update (recorded in federation.json for the server)"),
    force: bool = typer.Option(False, help="Re-issue an existing site's certificate and signing key"),
) -> None:
    """Step 2: issue a site's certificate and signing key, and write its kit folder DIR/sites/NAME.

    The kit holds ca.crt, NAME.crt, NAME.key, NAME-signing.key, server.pub and agent.yaml; the site's public signing key goes to DIR/server/trusted/ (the server's --trusted-keys).

    Next: `fedge provision broker --dir DIR --out BROKER_DIR`; copy the kit to the site, set data_dir in its agent.yaml, and run `fedge agent run --config KIT/agent.yaml` there.
    """
    from server.provision import ProvisionError, provision_site

    try:
        kit = provision_site(dir, name, broker=broker, max_samples=max_samples, force=force)
    except ProvisionError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"kit for {name}: {kit.dir} (NAME.key and NAME-signing.key are secret: copy the folder to the site only)")
    typer.echo(f"next: at the site, set data_dir in {kit.config.name}, then fedge agent run --config {kit.config}")
    typer.echo(f"      once every site has a kit: fedge provision broker --dir {dir} --out BROKER_DIR")


@app.command("broker")
def broker(
    dir: Path = typer.Option(..., "--dir", help="Provision folder made by `fedge provision init`"),
    out: Path = typer.Option(..., help="Folder for mosquitto.conf, acl, ca.crt, broker.crt and broker.key"),
    port: int = typer.Option(8883, min=1, max=65535, help="TLS listener port"),
    listen: str = typer.Option(None, help="Address to listen on (default: every interface)"),
    persistence: Path = typer.Option(None, help="Keep queued messages across broker restarts in this folder (default: off)"),
    max_packet_size: int = typer.Option(4 * 1024 * 1024, help="Largest MQTT packet the broker accepts, bytes (chunks are 256 KiB by default)"),
    max_queued: int = typer.Option(
        20000,
        help="QoS 1 messages queued per client (Mosquitto's default 1000 drops messages to the server at ~1000 sites); with --bridge, also what the bridge holds while the link is down",
    ),
    user: str = typer.Option(None, help="System user Mosquitto runs as when started as root (Mosquitto's default: mosquitto); it must read OUT"),
    bridge: str = typer.Option(None, help="Write a hospital's broker instead, bridged to the central one: the hospital's name (needs --sites, --central)"),
    sites: str = typer.Option(None, help="With --bridge: the hospital's sites, comma-separated; only their topics are forwarded"),
    central: str = typer.Option(None, help="With --bridge: HOST:PORT of the central broker's TLS listener"),
    host: list[str] = typer.Option([], help="With --bridge: DNS name or IP of the hospital broker for its certificate; repeatable"),
    restart_timeout: int = typer.Option(5, help="With --bridge: seconds between the bridge's reconnection attempts"),
) -> None:
    """Step 3: write a Mosquitto 2 config with mutual TLS and per-identity ACLs.

    One TLS listener that requires a certificate of the federation CA; the certificate's name is the username and the client id; no anonymous clients. The ACL lets only the server identity write announcements, globals, snapshots and control, and each site only its own update and status topics.

    Next: `mosquitto -c OUT/mosquitto.conf`, then `fedge server --broker mqtts://HOST:PORT --ca DIR/server/ca.crt --cert DIR/server/server.crt --key DIR/server/server-tls.key --signing-key DIR/server/server.key --trusted-keys DIR/server/trusted` (this command prints it with your paths).
    """
    from server.provision import ProvisionError, write_broker_config

    if bridge is not None:
        _bridge(dir, out, bridge, sites, central, port=port, listen=listen, hosts=host, user=user, persistence=persistence,
                restart_timeout=restart_timeout, max_queued=max_queued)  # fmt: skip
        return
    try:
        files = write_broker_config(
            dir,
            out,
            port=port,
            listen=listen,
            persistence_dir=persistence,
            max_packet_size=max_packet_size,
            user=user,
            max_queued_messages=max_queued,
        )
    except ProvisionError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {files.config} and {files.acl}; OUT must be readable by the user mosquitto runs as (chown -R mosquitto {files.dir})")
    from server.provision import load_federation

    fed = load_federation(dir)
    typer.echo(f"next: mosquitto -c {files.config}")
    typer.echo(
        f"then: fedge server --broker {fed.broker_url(port)} --federation {fed.name} --ca {fed.server_ca} "
        f"--cert {fed.server_cert} --key {fed.server_tls_key} --signing-key {fed.server_signing_key} "
        f"--trusted-keys {fed.trusted_keys}"
    )


def _bridge(dir: Path, out: Path, hospital: str, sites: str | None, central: str | None, *, port: int, listen: str | None,
            hosts: list[str], user: str | None, persistence: Path | None, restart_timeout: int, max_queued: int) -> None:  # fmt: skip
    """`fedge provision broker --bridge HOSPITAL`: the hospital's broker config and its bridge."""
    from server.bridge import provision_bridge
    from server.provision import ProvisionError

    if not sites or not central:
        raise fail("--bridge needs --sites (the hospital's sites, comma-separated) and --central HOST:PORT (the central broker)")
    try:
        files = provision_bridge(dir, hospital, [s for s in sites.split(",") if s], out, central=central, port=port, listen=listen,
                                 hosts=hosts, user=user, persistence_dir=persistence, restart_timeout=restart_timeout,
                                 max_queued_messages=max_queued)  # fmt: skip
    except ProvisionError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {files.config} and {files.acl} for hospital {hospital}: its sites connect here (mqtts://HOST:{port})")
    typer.echo(f"next: re-write the central broker's config (fedge provision broker --dir {dir} --out CENTRAL_DIR) so its ACL lets the bridge in,")
    typer.echo(f"      then mosquitto -c {files.config} at the hospital")
