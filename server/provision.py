"""Provisioning, the way NVIDIA FLARE ships startup kits: one federation CA, a certificate per identity,
a folder ("kit") per site, and a Mosquitto configuration whose ACL matches the topic layout.

Layout of a provision folder (DIR):

    federation.json            schema_version, federation name, broker hosts, provisioned sites
    ca/ca.crt, ca/ca.key       the federation CA (ECDSA P-256, self-signed); ca.key never leaves DIR
    broker/broker.crt|.key     the broker's TLS server certificate (CN=broker, SANs: localhost, 127.0.0.1, hosts)
    server/ca.crt              what `fedge server` needs: --ca, --cert server.crt, --key server-tls.key,
    server/server.crt|-tls.key   --signing-key server.key, --trusted-keys trusted/
    server/server.key|.pub     the server's Ed25519 signing key (announcements, globals, snapshots, control)
    server/trusted/NAME.pub    each site's Ed25519 public key
    sites/NAME/                the site's kit: ca.crt, NAME.crt, NAME.key, NAME-signing.key, server.pub, agent.yaml

Identities are certificate common names: `server` for the aggregation server, the site name for a site;
the broker takes the identity as MQTT username and client id, and its ACL grants topics by it.
Client certificates carry extendedKeyUsage clientAuth only and the broker's serverAuth only, so the
broker's certificate cannot log in as a client.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.files import atomic_write_bytes
from fedge.protocol.signing import Signer
from fedge.protocol.topics import check_name

SCHEMA_VERSION = 1
SERVER_IDENTITY = "server"
BROKER_IDENTITY = "broker"
RESERVED_NAMES = frozenset({SERVER_IDENTITY, BROKER_IDENTITY})
BRIDGE_PREFIX = "bridge-"  # hospital brokers' bridge identities (server.bridge); no site may take one
DEFAULT_TLS_PORT = 8883
DEFAULT_MAX_PACKET_SIZE = 4 * 1024 * 1024  # update/global chunks are 256 KiB by default
# QoS 1 messages Mosquitto holds for one client beyond those in flight (its own default, 1000, dropped
# messages to the server at 1000 sites: benchmarks/scale.py). The server reads every site's update and
# status: a few messages per site per round. Bytes bound it too (a flooding site fills the queue).
DEFAULT_MAX_QUEUED_MESSAGES = 20000
DEFAULT_MAX_QUEUED_BYTES = 512 * 1024 * 1024
CA_DAYS = 3650
CERT_DAYS = 825
_CLOCK_SKEW = dt.timedelta(minutes=5)


class ProvisionError(ValueError):
    """A provisioning request that cannot be done as asked; the message says what to run instead."""


@dataclass(frozen=True)
class SiteRecord:
    name: str
    max_samples: int | None = None
    certificate_serial: str = ""


@dataclass(frozen=True)
class Federation:
    """A provision folder: where every file lives, and what `federation.json` records."""

    dir: Path
    name: str
    hosts: tuple[str, ...] = ()
    sites: Mapping[str, SiteRecord] = field(default_factory=dict)

    # The CA and the broker
    @property
    def manifest(self) -> Path:
        return self.dir / "federation.json"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca" / "ca.key"

    @property
    def broker_cert(self) -> Path:
        return self.dir / "broker" / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.dir / "broker" / "broker.key"

    # The server identity: TLS client certificate, Ed25519 signing key, the sites' public keys
    @property
    def server_dir(self) -> Path:
        return self.dir / "server"

    @property
    def server_ca(self) -> Path:
        return self.server_dir / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.server_dir / "server.crt"

    @property
    def server_tls_key(self) -> Path:
        return self.server_dir / "server-tls.key"

    @property
    def server_signing_key(self) -> Path:
        return self.server_dir / "server.key"

    @property
    def server_public_key(self) -> Path:
        return self.server_dir / "server.pub"

    @property
    def trusted_keys(self) -> Path:
        return self.server_dir / "trusted"

    def kit(self, site: str) -> "SiteKit":
        return SiteKit(self.dir / "sites" / site, site)

    def broker_url(self, port: int = DEFAULT_TLS_PORT) -> str:
        return f"mqtts://{self.hosts[0] if self.hosts else 'localhost'}:{port}"


@dataclass(frozen=True)
class SiteKit:
    """Everything one site needs, in one folder to copy to the site's device."""

    dir: Path
    site: str

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.dir / f"{self.site}.crt"

    @property
    def key(self) -> Path:
        return self.dir / f"{self.site}.key"

    @property
    def signing_key(self) -> Path:
        return self.dir / f"{self.site}-signing.key"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.pub"

    @property
    def config(self) -> Path:
        return self.dir / "agent.yaml"


@dataclass(frozen=True)
class BrokerFiles:
    dir: Path
    config: Path
    acl: Path
    port: int


# --- federation.json -------------------------------------------------------------------------------


def load_federation(directory: str | Path) -> Federation:
    """Read DIR/federation.json; a folder that `fedge provision init` did not make is a ProvisionError."""
    directory = Path(directory).resolve()
    manifest = directory / "federation.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProvisionError(
            f"{directory} is not a provisioned federation (no federation.json); run `fedge provision init --federation NAME --out {directory}` first"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ProvisionError(f"cannot read {manifest}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ProvisionError(f"{manifest}: schema_version {data.get('schema_version') if isinstance(data, dict) else None!r} is not {SCHEMA_VERSION}")
    try:
        name = check_name("federation", str(data["federation"]))
        hosts = tuple(str(h) for h in data.get("hosts", []))
        sites = {
            str(site): SiteRecord(
                name=check_name("site", str(site)),
                max_samples=rec.get("max_samples"),
                certificate_serial=str(rec.get("certificate_serial", "")),
            )
            for site, rec in (data.get("sites") or {}).items()
        }
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ProvisionError(f"{manifest} is malformed: {exc}") from None
    return Federation(directory, name, hosts, sites)


def _save_manifest(fed: Federation) -> None:
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "federation": fed.name,
        "hosts": list(fed.hosts),
        "sites": {s.name: {"max_samples": s.max_samples, "certificate_serial": s.certificate_serial} for s in sorted(fed.sites.values(), key=lambda s: s.name)},
    }
    _write_public(fed.manifest, (json.dumps(data, indent=2) + "\n").encode())


# --- certificates ----------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (mode 0600 from the start, not chmod after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    """Certificates, public keys and configs: world-readable (Mosquitto may read them as its own user)."""
    atomic_write_bytes(path, data)
    path.chmod(0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, federation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedge federation {federation}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(fed: Federation) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot load the federation CA from {fed.ca_cert.parent}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{fed.ca_key} is not an EC private key")
    return cert, key


def _make_ca(federation: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = _name(f"fedge {federation} CA", federation)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    federation: str,
    common_name: str,
    *,
    server: bool,
    hosts: Iterable[str] = (),
    days: int = CERT_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate: a TLS server certificate (the broker) or a client certificate (server, sites)."""
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, federation))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in _unique(hosts)]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def check_host(host: str) -> str:
    """A broker host name or IP address for the certificate's SANs."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if (
        not host
        or len(host) > 253
        or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() and not label.startswith("-") and not label.endswith("-")
            for label in labels
        )
    ):
        raise ProvisionError(f"--host {host!r} is not a DNS name or IP address, e.g. --host broker.hospital.example")
    return host.rstrip(".").lower()


def check_site_name(name: str) -> str:
    try:
        check_name("site", name)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    if name in RESERVED_NAMES:
        raise ProvisionError(f"site name {name!r} is reserved for the {name} identity; pick another, e.g. {name}-site")
    if name.startswith(BRIDGE_PREFIX):
        raise ProvisionError(f"site names starting with {BRIDGE_PREFIX!r} are reserved for hospital brokers' bridges; pick another")
    return name


# --- the three steps -------------------------------------------------------------------------------


def init_federation(
    federation: str, out: str | Path, *, hosts: Iterable[str] = (), force: bool = False, ca_days: int = CA_DAYS, cert_days: int = CERT_DAYS
) -> Federation:
    """Make DIR with the federation CA, the broker's TLS certificate, the server identity's client
    certificate and the server's Ed25519 signing key. Refuses to replace an existing CA unless `force`
    (a new CA invalidates every certificate issued before: every site needs a new kit)."""
    try:
        check_name("federation", federation)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    hosts = tuple(_unique(check_host(h) for h in hosts))
    fed = Federation(Path(out).resolve(), federation, hosts, {})
    if fed.ca_cert.exists() or fed.ca_key.exists() or fed.manifest.exists():
        if not force:
            raise ProvisionError(
                f"{fed.dir} already holds a federation CA; pass --force to replace it (every kit issued from it "
                "then stops working), or use `fedge provision site NAME --dir DIR` to add a site"
            )
        for sub in ("ca", "broker", "server", "sites"):
            shutil.rmtree(fed.dir / sub, ignore_errors=True)
        fed.manifest.unlink(missing_ok=True)
    fed.dir.mkdir(parents=True, exist_ok=True)
    for folder in (fed.ca_cert.parent, fed.broker_cert.parent, fed.server_dir, fed.trusted_keys, fed.dir / "sites"):
        folder.mkdir(parents=True, exist_ok=True)
    fed.ca_cert.parent.chmod(0o700)

    ca_cert, ca_key = _make_ca(federation, ca_days)
    _write_private(fed.ca_key, _key_pem(ca_key))
    _write_public(fed.ca_cert, _cert_pem(ca_cert))

    broker_cert, broker_key = _issue(ca_cert, ca_key, federation, BROKER_IDENTITY, server=True, hosts=("localhost", "127.0.0.1", *hosts), days=cert_days)
    _write_private(fed.broker_key, _key_pem(broker_key))
    _write_public(fed.broker_cert, _cert_pem(broker_cert))

    server_cert, server_key = _issue(ca_cert, ca_key, federation, SERVER_IDENTITY, server=False, days=cert_days)
    _write_private(fed.server_tls_key, _key_pem(server_key))
    _write_public(fed.server_cert, _cert_pem(server_cert))
    _write_public(fed.server_ca, _cert_pem(ca_cert))
    Signer.generate().save(fed.server_signing_key, fed.server_public_key)
    _save_manifest(fed)
    return fed


def provision_site(
    directory: str | Path,
    site: str,
    *,
    broker: str | None = None,
    max_samples: int | None = None,
    force: bool = False,
    cert_days: int = CERT_DAYS,
) -> SiteKit:
    """Issue SITE's client certificate and Ed25519 signing key into DIR/sites/SITE (the kit, with the CA,
    the server's public key and an agent.yaml), and put the site's public key in the server's trusted folder."""
    from edge_client.config import AgentConfig

    check_site_name(site)
    if max_samples is not None and max_samples < 1:
        raise ProvisionError(f"--max-samples must be at least 1, got {max_samples}")
    fed = load_federation(directory)
    kit = fed.kit(site)
    if (kit.cert.exists() or site in fed.sites) and not force:
        raise ProvisionError(
            f"site {site!r} is already provisioned ({kit.dir}); pass --force to issue a new certificate and signing key "
            "(the old certificate stays valid until it expires: the broker has no revocation list yet)"
        )
    ca_cert, ca_key = _load_ca(fed)
    cert, key = _issue(ca_cert, ca_key, fed.name, site, server=False, days=cert_days)
    kit.dir.mkdir(parents=True, exist_ok=True)
    kit.dir.chmod(0o700)
    _write_private(kit.key, _key_pem(key))
    _write_public(kit.cert, _cert_pem(cert))
    _write_public(kit.ca, fed.ca_cert.read_bytes())
    _write_public(kit.server_key, fed.server_public_key.read_bytes())

    signer = Signer.generate()
    public = fed.trusted_keys / f"{site}.pub"
    fed.trusted_keys.mkdir(parents=True, exist_ok=True)
    signer.save(kit.signing_key, public)

    config = AgentConfig(
        broker=broker or fed.broker_url(),
        site=site,
        federation=fed.name,
        # Names beside agent.yaml (AgentConfig.from_yaml resolves them there): the kit can be copied anywhere.
        signing_key=Path(kit.signing_key.name),
        server_key=Path(kit.server_key.name),
        ca=Path(kit.ca.name),
        cert=Path(kit.cert.name),
        key=Path(kit.key.name),
        state_dir=Path("agent-state"),
    )
    _write_public(kit.config, config.to_yaml().encode())
    sites = dict(fed.sites)
    sites[site] = SiteRecord(site, max_samples, format(cert.serial_number, "x"))
    _save_manifest(Federation(fed.dir, fed.name, fed.hosts, sites))
    return kit


def write_broker_config(
    directory: str | Path,
    out: str | Path,
    *,
    port: int = DEFAULT_TLS_PORT,
    listen: str | None = None,
    persistence_dir: str | Path | None = None,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    log_dest: str = "stderr",
    user: str | None = None,
    acl: str | None = None,
    certificate: tuple[bytes, bytes] | None = None,
    extra: Sequence[str] = (),
) -> BrokerFiles:
    """Write OUT/mosquitto.conf and OUT/acl (with copies of the CA and the broker's certificate and key)
    for a Mosquitto 2 broker that requires client certificates from the federation CA.

    Started as root, Mosquitto drops to `user` (its default: `mosquitto`) before it reads the ACL and
    the key, so OUT must be readable by that user (e.g. `chown -R mosquitto OUT`).

    `acl`, `certificate` (PEM certificate and key) and `extra` config lines are for a hospital's
    bridged broker (`server.bridge`); by default the ACL is the central one, bridges included."""
    if not 1 <= port <= 65535:
        raise ProvisionError(f"--port {port} is not a TCP port (1-65535)")
    if max_packet_size < 64 * 1024:
        raise ProvisionError(f"--max-packet-size {max_packet_size} is below 64 KiB; chunks are 256 KiB by default")
    if max_queued_messages < 1000:
        raise ProvisionError(f"--max-queued {max_queued_messages} is below Mosquitto's own default of 1000 messages per client")
    if listen is not None:
        check_host(listen)
    if user is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", user):
        raise ProvisionError(f"--user {user!r} is not a system user name, e.g. mosquitto")
    fed = load_federation(directory)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ca, cert, key = out / "ca.crt", out / "broker.crt", out / "broker.key"
    _write_public(ca, fed.ca_cert.read_bytes())
    cert_pem, key_pem = certificate or (fed.broker_cert.read_bytes(), fed.broker_key.read_bytes())
    _write_public(cert, cert_pem)
    _write_private(key, key_pem)
    if acl is None:
        from server.bridge import central_acl_text

        acl = acl_text(fed.name) + central_acl_text(fed)
    acl_file = out / "acl"
    _write_public(acl_file, acl.encode())
    lines = [
        f"# Mosquitto 2 configuration for fedge federation {fed.name!r}, written by `fedge provision broker`.",
        "# Start it with: mosquitto -c " + str(out / "mosquitto.conf"),
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl_file}",
        f"max_packet_size {max_packet_size}",
        f"max_queued_messages {max_queued_messages}",
        f"max_queued_bytes {DEFAULT_MAX_QUEUED_BYTES}",
    ]
    if user is not None:
        lines.append(f"user {user}")
    if persistence_dir is not None:
        pdir = Path(persistence_dir).resolve()
        lines += ["persistence true", f"persistence_location {pdir}/"]
    else:
        lines += ["persistence false"]
    lines += [
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "",
        "# The only listener: TLS, and every client must show a certificate of the federation CA.",
        f"listener {port}" + (f" {listen}" if listen else ""),
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "# the certificate's CN is the MQTT username (what the ACL grants by) and the client id,",
        "# so nobody can take over another identity's session",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        *extra,
        "",
    ]
    config = out / "mosquitto.conf"
    _write_public(config, "\n".join(lines).encode())
    return BrokerFiles(out, config, acl_file, port)


def server_topics(root: str) -> tuple[str, ...]:
    """What only the server writes and every identity reads (announcements, globals, snapshots, control)."""
    return (f"{root}/round/+/global", f"{root}/round/+/global/+", f"{root}/snapshot", f"{root}/snapshot/+", f"{root}/control")


def acl_text(federation: str) -> str:
    """Mosquitto ACL: the server identity may read and write the whole federation; every other identity
    reads what the server publishes (announcements, globals, snapshots, control) and its own status,
    and writes only its own update chunks and status. Sites never read each other's updates: a
    delta says something about a site's patients (pattern lines apply to every user)."""
    root = f"fedge/{check_name('federation', federation)}"
    return "\n".join(
        [
            f"# fedge federation {federation!r}: written by `fedge provision broker`.",
            "# Identities are certificate CNs (use_identity_as_username). Anything not granted is denied;",
            "# Mosquitto drops a denied publish without telling an MQTT 3.1.1 client.",
            "",
            f"user {SERVER_IDENTITY}",
            f"topic readwrite {root}/#",
            "",
            "# every identity, sites included (Mosquitto warns that read patterns without %u or %c apply to all: they are meant to)",
            *(f"pattern read {topic}" for topic in server_topics(root)),
            f"pattern readwrite {root}/status/%u",
            f"pattern write {root}/round/+/update/%u/+",
            "",
        ]
    )
