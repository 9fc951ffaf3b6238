"""A hospital's own Mosquitto, bridged to the central broker (`fedge provision broker --bridge`).

Sites connect to their hospital's broker; its bridge carries their updates and status up and the
server's announcements, globals, snapshots and control down, over one mutual-TLS connection whose
certificate identity is `bridge-<hospital>`. Three layers keep a hospital inside its own topics:
- the hospital broker's ACL lets only that hospital's sites write, each only its own update and
  status topics (another site of the federation may connect there, but may write nothing);
- the bridge forwards out only those sites' topics, and in only what the server publishes (no site
  ever reads another site's update, here as on the central broker);
- the central broker's ACL lets `bridge-<hospital>` write only those sites' topics, so even a
  compromised hospital broker can drop or delay its own sites' messages, never write another's
  (and cannot forge theirs: updates and status are signed by the sites' keys).

Bridges are recorded in DIR/bridges.json; the central broker's ACL (`fedge provision broker`
without --bridge) grants them, so re-write the central config after adding a bridge."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedge.protocol.topics import check_name
from server.provision import (
    BRIDGE_PREFIX,
    DEFAULT_MAX_QUEUED_MESSAGES,
    DEFAULT_TLS_PORT,
    BrokerFiles,
    Federation,
    ProvisionError,
    _cert_pem,
    _issue,
    _key_pem,
    _load_ca,
    _write_private,
    _write_public,
    check_host,
    load_federation,
    server_topics,
    write_broker_config,
)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Bridge:
    """One hospital's broker: the sites it serves and where its bridge connects."""

    hospital: str
    sites: tuple[str, ...]
    central: str  # host:port of the central broker's TLS listener

    @property
    def identity(self) -> str:
        return bridge_identity(self.hospital)


def bridge_identity(hospital: str) -> str:
    """The bridge's certificate CN: a name no site may take (`check_site_name` refuses the prefix)."""
    return BRIDGE_PREFIX + hospital


def _bridges_file(fed: Federation) -> Path:
    return fed.dir / "bridges.json"


def load_bridges(fed: Federation) -> dict[str, Bridge]:
    path = _bridges_file(fed)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ProvisionError(f"{path}: schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}")
        return {h: Bridge(check_name("hospital", h), tuple(check_name("site", s) for s in b["sites"]), str(b["central"]))
                for h, b in data["bridges"].items()}  # fmt: skip
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, ProvisionError):
            raise
        raise ProvisionError(f"{path} is malformed: {exc}") from None


def _save_bridges(fed: Federation, bridges: Mapping[str, Bridge]) -> None:
    data = {"schema_version": SCHEMA_VERSION,
            "bridges": {b.hospital: {"sites": list(b.sites), "central": b.central} for b in sorted(bridges.values(), key=lambda b: b.hospital)}}  # fmt: skip
    _write_public(_bridges_file(fed), (json.dumps(data, indent=2) + "\n").encode())


def check_central(central: str) -> tuple[str, int]:
    """`host:port` (port defaults to 8883) of the central broker, as the bridge dials it."""
    host, _, port = central.rpartition(":") if ":" in central else (central, "", str(DEFAULT_TLS_PORT))
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProvisionError(f"--central {central!r}: give HOST:PORT of the central broker's TLS listener, e.g. broker.example:8883")
    return check_host(host), int(port)


def hospital_acl_text(federation: str, hospital: str, sites: Iterable[str]) -> str:
    """The hospital broker's ACL: everyone may read what the server publishes; only this hospital's
    sites may write, each its own update and status topics. No user may read an update."""
    root = f"fedge/{check_name('federation', federation)}"
    lines = [f"# fedge federation {federation!r}, hospital {hospital!r}: written by `fedge provision broker --bridge`.",
             "# Identities are certificate CNs; anything not granted is denied.", ""]  # fmt: skip
    for site in sites:
        lines += [f"user {site}", f"topic write {root}/round/+/update/{site}/+", f"topic readwrite {root}/status/{site}", ""]
    lines += ["# every identity (Mosquitto warns that read patterns without %u or %c apply to all: they are meant to)"]
    lines += [f"pattern read {topic}" for topic in server_topics(root)]
    return "\n".join(lines) + "\n"


def central_acl_text(fed: Federation) -> str:
    """What the central broker's ACL adds for each recorded bridge: write only its sites' topics
    (the server's topics it reads through the patterns every identity has)."""
    root = f"fedge/{fed.name}"
    lines = []
    for bridge in sorted(load_bridges(fed).values(), key=lambda b: b.hospital):
        lines += [f"# hospital {bridge.hospital!r}: its broker's bridge carries these sites' updates and status", f"user {bridge.identity}"]
        for site in bridge.sites:
            lines += [f"topic write {root}/round/+/update/{site}/+", f"topic write {root}/status/{site}"]
        lines.append("")
    return "\n".join(lines)


def bridge_section(fed: Federation, bridge: Bridge, folder: Path, restart_timeout: int) -> list[str]:
    """mosquitto.conf lines of the bridge: TLS with the bridge's certificate, persistent sessions on
    both ends (what a site sends while the link is down waits in this broker), QoS 1 both ways."""
    host, port = check_central(bridge.central)
    root = f"fedge/{fed.name}"
    lines = [
        "",
        f"# The bridge to the central broker: only {len(bridge.sites)} site(s) of hospital {bridge.hospital!r} go up,",
        "# only what the server publishes comes down.",
        f"connection {bridge.identity}",
        f"address {host}:{port}",
        f"remote_clientid {bridge.identity}",
        "bridge_protocol_version mqttv311",
        "try_private true",  # the central Mosquitto then keeps the retain flag of what it forwards
        "cleansession false",
        "local_cleansession false",
        "notifications false",  # no $SYS/... publishes at the central broker, which its ACL would deny anyway
        f"restart_timeout {restart_timeout}",
        f"bridge_cafile {folder / 'ca.crt'}",
        f"bridge_certfile {folder / 'bridge.crt'}",
        f"bridge_keyfile {folder / 'bridge.key'}",
        "bridge_tls_version tlsv1.2",
        "bridge_insecure false",
    ]
    for site in bridge.sites:
        lines += [f"topic {root}/round/+/update/{site}/+ out 1", f"topic {root}/status/{site} out 1"]
    lines += [f"topic {topic} in 1" for topic in server_topics(root)]
    return lines + [""]


def provision_bridge(
    directory: str | Path,
    hospital: str,
    sites: Iterable[str],
    out: str | Path,
    *,
    central: str,
    port: int = DEFAULT_TLS_PORT,
    listen: str | None = None,
    hosts: Iterable[str] = (),
    user: str | None = None,
    persistence_dir: str | Path | None = None,
    restart_timeout: int = 5,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
) -> BrokerFiles:
    """Write OUT/mosquitto.conf (TLS listener for the hospital's sites, their ACL, the bridge) with
    the hospital broker's own TLS certificate (SANs localhost, 127.0.0.1 and `hosts`) and the
    bridge's client certificate, and record the bridge for the central broker's ACL."""
    check_name("hospital", hospital)
    fed = load_federation(directory)
    sites = tuple(dict.fromkeys(sites))
    if not sites:
        raise ProvisionError("--sites: name the hospital's sites (provisioned with `fedge provision site NAME`), comma-separated")
    missing = [s for s in sites if s not in fed.sites]
    if missing:
        raise ProvisionError(f"sites {missing} are not provisioned in {fed.dir}; run `fedge provision site NAME --dir {fed.dir}` first")
    bridges = load_bridges(fed)
    elsewhere = {s: b.hospital for b in bridges.values() if b.hospital != hospital for s in b.sites if s in sites}
    if elsewhere:
        raise ProvisionError(f"sites already served by another hospital's bridge: {elsewhere}; a site belongs to one hospital")
    if not 1 <= restart_timeout <= 3600:
        raise ProvisionError(f"--restart-timeout {restart_timeout} must be 1-3600 s")
    check_central(central)
    hosts = tuple(check_host(h) for h in hosts)
    ca_cert, ca_key = _load_ca(fed)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bridge = Bridge(hospital, sites, central)
    client_cert, client_key = _issue(ca_cert, ca_key, fed.name, bridge.identity, server=False)
    _write_public(out / "bridge.crt", _cert_pem(client_cert))
    _write_private(out / "bridge.key", _key_pem(client_key))
    broker_cert, broker_key = _issue(ca_cert, ca_key, fed.name, f"broker-{hospital}", server=True, hosts=("localhost", "127.0.0.1", *hosts))
    files = write_broker_config(
        fed.dir, out, port=port, listen=listen, user=user, persistence_dir=persistence_dir,
        acl=hospital_acl_text(fed.name, hospital, sites), certificate=(_cert_pem(broker_cert), _key_pem(broker_key)),
        max_queued_messages=max_queued_messages, extra=bridge_section(fed, bridge, out, restart_timeout),
    )  # fmt: skip
    bridges[hospital] = bridge
    _save_bridges(fed, bridges)
    return files
