"""DICOM TLS on the receiver: certificates made here with `cryptography` (a federation CA, the
receiver's certificate, a scanner's client certificate, and a stranger's CA), a real pynetdicom
SCU sending real DICOM over TLS, and dcmtk's storescu trying in plain TCP."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from data_fixtures import data_path
from typer.testing import CliRunner

from edge_client.ingest.pipeline import Ingestor
from edge_client.ingest.reader import ReadConfig
from edge_client.ingest.scp import ScpConfig, ScpTls, StorageSCP
from edge_client.ingest.store import DatasetStore
from fedge.cli.ingest import ingest

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(folder / f"{stem}.crt", folder / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem


def make_ca(folder: Path, common: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, common, cert, key), cert, key


def issue(folder: Path, common: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, server: bool) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(folder, common, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: Path
    receiver: Pem
    scanner: Pem
    stranger: Pem  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = make_ca(folder, "federation-ca")
    _, other_cert, other_key = make_ca(folder, "other-ca")
    return Pki(
        ca=ca.cert,
        receiver=issue(folder, "site-a-receiver", ca_cert, ca_key, server=True),
        scanner=issue(folder, "ct-scanner", ca_cert, ca_key, server=False),
        stranger=issue(folder, "stranger", other_cert, other_key, server=False),
    )


@pytest.fixture
def tls_scp(tmp_path: Path, pki: Pki) -> Iterator[StorageSCP]:
    ingestor = Ingestor(DatasetStore.create(tmp_path / "store", 28), ReadConfig())
    tls = ScpTls(ca=pki.ca, cert=pki.receiver.cert, key=pki.receiver.key)
    server = StorageSCP(ingestor, ScpConfig(ae_title="FEDGE", port=0, allow_ae=("CT_SCANNER",), tls=tls))
    server.start()
    yield server
    server.stop()


def _client_context(ca: Path, client: Pem | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def _store(port: int, path: Path, tls: ssl.SSLContext | None) -> int | None:
    """Send one file with pynetdicom as the SCU; the C-STORE status, or None when no association."""
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title="CT_SCANNER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FEDGE", tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def test_tls_sender_with_a_certificate_from_the_ca_is_stored(tls_scp: StorageSCP, pki: Pki, data_dir: Path) -> None:
    mr = data_path(data_dir, "dicom", "modalities", "MR_small.dcm")
    assert _store(tls_scp.port, mr, _client_context(pki.ca, pki.scanner)) == 0x0000
    assert len(tls_scp.ingestor.store) == 1


def test_plain_foreign_and_anonymous_senders_are_refused(tls_scp: StorageSCP, pki: Pki, data_dir: Path, storescu: str) -> None:
    mr = data_path(data_dir, "dicom", "modalities", "MR_small.dcm")
    assert _store(tls_scp.port, mr, None) is None  # plain TCP to a TLS port
    plain = subprocess.run(
        [storescu, "-aet", "CT_SCANNER", "-aec", "FEDGE", "-to", "10", "127.0.0.1", str(tls_scp.port), str(mr)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode != 0
    assert _store(tls_scp.port, mr, _client_context(pki.ca, pki.stranger)) is None  # another CA's certificate
    assert _store(tls_scp.port, mr, _client_context(pki.ca, None)) is None  # TLS, but no client certificate
    assert len(tls_scp.ingestor.store) == 0
    # the receiver is still serving
    assert _store(tls_scp.port, mr, _client_context(pki.ca, pki.scanner)) == 0x0000


def _said(output: str) -> str:
    """The CLI's message without Rich's box and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def test_tls_options_are_checked(tmp_path: Path, pki: Pki) -> None:
    app = typer.Typer()
    app.command()(ingest)
    base = ["--store", str(tmp_path / "store"), "--allow-ae", "CT_SCANNER", "--port", "0"]
    no_scp = CliRunner().invoke(app, [str(tmp_path), "--store", str(tmp_path / "s2"), "--tls-ca", str(pki.ca)])
    assert no_scp.exit_code == 2 and "add --scp" in _said(no_scp.output)
    partial = CliRunner().invoke(app, ["--scp", *base, "--tls-ca", str(pki.ca)])
    assert partial.exit_code == 2 and "all three" in _said(partial.output)
    missing = CliRunner().invoke(
        app, ["--scp", *base, "--tls-ca", str(tmp_path / "nope.pem"), "--tls-cert", str(pki.receiver.cert), "--tls-key", str(pki.receiver.key)]
    )
    assert missing.exit_code == 2 and "does not exist" in _said(missing.output)
    wrong_key = CliRunner().invoke(app, ["--scp", *base, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.receiver.cert), "--tls-key", str(pki.scanner.key)])
    assert wrong_key.exit_code == 2 and "cannot start" in _said(wrong_key.output)
