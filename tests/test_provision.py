"""`fedge provision` against a real Mosquitto running the generated config: mutual TLS keeps strangers
out, the ACL keeps each site to its own topics, and the CLI makes all of it from nothing."""

from __future__ import annotations

import contextlib
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from brokers import SecureBroker, _free_port, current_user, running_mosquitto
from cryptography import x509
from typer.testing import CliRunner

from fedge.cli.main import app
from fedge.identity import certificate_identity
from fedge.transport import Message, MqttSession, TlsFiles

pytestmark = pytest.mark.mosquitto

ROOT = "fedge/secure"
QUIET = 1.0  # seconds a subscriber keeps listening after the last authorized message


@contextlib.contextmanager
def session(broker: SecureBroker, identity: str, *, client_id: str | None = None, tls: TlsFiles | None = None) -> Iterator[MqttSession]:
    s = MqttSession(broker.url, client_id or identity, clean_session=True, tls=tls or broker.tls(identity)).connect(timeout=20)
    try:
        yield s
    finally:
        s.close()


def subscribed(s: MqttSession, *filters: str, probe: str) -> None:
    """Subscribe and wait until the subscription is live: `probe` (a topic this identity may write
    and the filters match) comes back."""
    s.subscribe(*filters)
    token = uuid.uuid4().bytes
    s.publish(probe, token)
    while True:
        msg = s.get(timeout=20)
        assert msg is not None, f"subscription {filters} never delivered the probe on {probe}"
        if msg.payload == token:
            return


def received_until(s: MqttSession, last_topic: str) -> list[Message]:
    """Messages until one on `last_topic` arrives, then whatever else comes within QUIET seconds."""
    got: list[Message] = []
    while not any(m.topic == last_topic for m in got):
        msg = s.get(timeout=20)
        assert msg is not None, f"nothing on {last_topic} within 20 s; got {[m.topic for m in got]}"
        got.append(msg)
    while (msg := s.get(timeout=QUIET)) is not None:
        got.append(msg)
    return got


# --- who may connect -------------------------------------------------------------------------------


def test_client_without_certificate_is_refused(secure_mosquitto):
    tls = TlsFiles(ca=secure_mosquitto.kits["site-1"] / "ca.crt")
    with pytest.raises(ConnectionError, match="client certificate") as info:
        MqttSession(secure_mosquitto.url, "stranger", clean_session=True, tls=tls).connect(timeout=20)
    assert "--cert" in str(info.value)


def test_certificate_of_another_ca_is_refused(secure_mosquitto, tmp_path):
    from server.provision import init_federation, provision_site

    other = init_federation("secure", tmp_path / "impostor")  # same federation name, different CA
    kit = provision_site(other.dir, "site-1")
    tls = TlsFiles(ca=secure_mosquitto.kits["site-1"] / "ca.crt", cert=kit.cert, key=kit.key)
    with pytest.raises(ConnectionError, match="refused") as info:
        MqttSession(secure_mosquitto.url, "site-1", clean_session=True, tls=tls).connect(timeout=20)
    assert "fedge provision site" in str(info.value)


def test_broker_certificate_cannot_log_in_as_a_client(secure_mosquitto):
    broker_dir = secure_mosquitto.broker_dir
    tls = TlsFiles(ca=broker_dir / "ca.crt", cert=broker_dir / "broker.crt", key=broker_dir / "broker.key")
    with pytest.raises(ConnectionError, match="refused"):
        MqttSession(secure_mosquitto.url, "broker", clean_session=True, tls=tls).connect(timeout=20)


def test_client_that_does_not_trust_the_federation_ca_stops_at_once(secure_mosquitto, tmp_path):
    from server.provision import init_federation

    other = init_federation("other", tmp_path / "other")
    tls = TlsFiles(ca=other.ca_cert, cert=secure_mosquitto.tls("site-1").cert, key=secure_mosquitto.tls("site-1").key)
    with pytest.raises(ConnectionError, match="--ca"):
        MqttSession(secure_mosquitto.url, "site-1", clean_session=True, tls=tls).connect(timeout=20)


# --- what each identity may write --------------------------------------------------------------------


def test_site_writes_only_its_own_update_and_status(secure_mosquitto):
    with session(secure_mosquitto, "server") as server, session(secure_mosquitto, "site-1") as site:
        subscribed(server, f"{ROOT}/#", probe=f"{ROOT}/status/server")
        forbidden = [
            f"{ROOT}/round/1/update/site-2/0",  # another site's update
            f"{ROOT}/status/site-2",  # another site's status
            f"{ROOT}/round/1/global",  # an announcement
            f"{ROOT}/round/1/global/0",  # a global chunk
            f"{ROOT}/control",
            f"{ROOT}/snapshot",
            f"{ROOT}/snapshot/0",
            f"{ROOT}/round/1/update/site-1",  # not an update chunk topic
        ]
        for topic in forbidden:
            site.publish(topic, b"forged")
        site.publish(f"{ROOT}/round/1/update/site-1/0", b"chunk")
        site.publish(f"{ROOT}/status/site-1", b"online")
        got = received_until(server, f"{ROOT}/status/site-1")
    assert [(m.topic, m.payload) for m in got] == [
        (f"{ROOT}/round/1/update/site-1/0", b"chunk"),
        (f"{ROOT}/status/site-1", b"online"),
    ]


def test_a_site_cannot_read_another_sites_update_or_status(secure_mosquitto):
    with session(secure_mosquitto, "site-1") as site1, session(secure_mosquitto, "site-2") as site2:
        subscribed(site2, f"{ROOT}/#", probe=f"{ROOT}/status/site-2")
        site1.publish(f"{ROOT}/round/1/update/site-1/0", b"a delta of site-1's patients")
        site1.publish(f"{ROOT}/status/site-1", b"online")
        site2.publish(f"{ROOT}/status/site-2", b"done")
        got = received_until(site2, f"{ROOT}/status/site-2")
    assert [(m.topic, m.payload) for m in got] == [(f"{ROOT}/status/site-2", b"done")]


def test_server_announcement_reaches_the_site(secure_mosquitto):
    with session(secure_mosquitto, "server") as server, session(secure_mosquitto, "site-1") as site:
        subscribed(site, f"{ROOT}/round/+/global", f"{ROOT}/control", f"{ROOT}/status/site-1", probe=f"{ROOT}/status/site-1")
        server.publish(f"{ROOT}/round/7/global", b"announcement")
        server.publish(f"{ROOT}/control", b"finished")
        got = received_until(site, f"{ROOT}/control")
    assert [(m.topic, m.payload) for m in got] == [(f"{ROOT}/round/7/global", b"announcement"), (f"{ROOT}/control", b"finished")]


def test_site_cannot_take_over_the_server_client_id(secure_mosquitto):
    """The client id is the certificate identity: a site that asks for id `server` gets `site-1`, and
    the server's session stays up."""
    tls = secure_mosquitto.tls("server")
    dropped: list[object] = []
    victim = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="server", protocol=mqtt.MQTTv311)
    victim.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
    victim.on_disconnect = lambda *args: dropped.append(args[3])
    victim.connect(secure_mosquitto.host, secure_mosquitto.port)
    victim.loop_start()
    try:
        with session(secure_mosquitto, "site-1", client_id="server") as impostor:
            # Its own status topic works (it is site-1, whatever id it asked for), and the victim stays connected.
            subscribed(impostor, f"{ROOT}/status/site-1", probe=f"{ROOT}/status/site-1")
        assert victim.is_connected() and dropped == []
    finally:
        victim.loop_stop()
        victim.disconnect()


# --- certificates and the CLI ------------------------------------------------------------------------


def test_certificate_identity_is_the_common_name(secure_mosquitto):
    assert certificate_identity(secure_mosquitto.tls("site-2").cert) == "site-2"
    assert certificate_identity(secure_mosquitto.tls("server").cert) == "server"
    with pytest.raises(ValueError, match="not a PEM certificate"):
        certificate_identity(secure_mosquitto.kits["site-2"] / "agent.yaml")


def invoke(*args: str):
    return CliRunner().invoke(app, ["provision", *args])


def test_cli_provisions_a_federation_a_broker_accepts(tmp_path):
    from edge_client.config import AgentConfig

    prov, port = tmp_path / "prov", _free_port()
    result = invoke("init", "--federation", "clinic", "--out", str(prov), "--host", "fl.hospital.example")
    assert result.exit_code == 0, result.output
    assert "fedge provision site NAME" in result.output
    result = invoke("site", "site-1", "--dir", str(prov), "--broker", f"mqtts://127.0.0.1:{port}", "--max-samples", "5000")
    assert result.exit_code == 0, result.output
    assert "fedge agent run --config" in result.output
    result = invoke("broker", "--dir", str(prov), "--out", str(tmp_path / "broker"), "--port", str(port), "--listen", "127.0.0.1", "--user", current_user())
    assert result.exit_code == 0, result.output
    assert "mosquitto -c" in result.output and "fedge server" in result.output

    kit = prov / "sites" / "site-1"
    assert sorted(p.name for p in kit.iterdir()) == ["agent.yaml", "ca.crt", "server.pub", "site-1-signing.key", "site-1.crt", "site-1.key"]
    for secret in (
        kit / "site-1.key",
        kit / "site-1-signing.key",
        prov / "ca" / "ca.key",
        prov / "server" / "server.key",
        prov / "server" / "server-tls.key",
        prov / "broker" / "broker.key",
        tmp_path / "broker" / "broker.key",
    ):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert (prov / "server" / "trusted" / "site-1.pub").exists()
    assert (kit / "server.pub").read_bytes() == (prov / "server" / "server.pub").read_bytes()

    ca = x509.load_pem_x509_certificate((prov / "ca" / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    site_cert = x509.load_pem_x509_certificate((kit / "site-1.crt").read_bytes())
    site_cert.verify_directly_issued_by(ca)
    broker_cert = x509.load_pem_x509_certificate((prov / "broker" / "broker.crt").read_bytes())
    sans = broker_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.hospital.example" in sans.get_values_for_type(x509.DNSName)

    from server.provision import load_federation

    fed = load_federation(prov)
    assert (fed.name, fed.hosts, fed.sites["site-1"].max_samples) == ("clinic", ("fl.hospital.example",), 5000)

    import shutil

    moved = tmp_path / "copied-to-the-site"  # a kit holds names, not paths: it works wherever it is copied
    shutil.copytree(kit, moved)
    config = AgentConfig.from_yaml(moved / "agent.yaml")
    assert (config.cert, config.signing_key, config.state_dir) == (moved / "site-1.crt", moved / "site-1-signing.key", moved / "agent-state")
    assert (config.site, config.federation, config.broker) == ("site-1", "clinic", f"mqtts://127.0.0.1:{port}")
    with running_mosquitto(tmp_path / "broker" / "mosquitto.conf", port, tmp_path / "mosquitto.log"):
        tls = TlsFiles(ca=config.ca, cert=config.cert, key=config.key)
        s = MqttSession(config.broker, certificate_identity(config.cert), clean_session=True, tls=tls).connect(timeout=20)
        s.close()


def test_cli_refuses_bad_names_repeats_and_site_before_init(tmp_path):
    prov = tmp_path / "prov"
    result = invoke("site", "site-1", "--dir", str(prov))
    assert result.exit_code == 2
    assert "fedge provision init" in result.output
    assert invoke("init", "--federation", "bad/name", "--out", str(prov)).exit_code == 2
    assert invoke("init", "--federation", "clinic", "--out", str(prov)).exit_code == 0
    ca_before = (prov / "ca" / "ca.crt").read_bytes()
    result = invoke("init", "--federation", "clinic", "--out", str(prov))
    assert result.exit_code == 2 and "--force" in result.output
    assert (prov / "ca" / "ca.crt").read_bytes() == ca_before
    for name, why in (("a/b", "invalid"), ("site+1", "invalid"), ("server", "reserved"), ("broker", "reserved")):
        result = invoke("site", name, "--dir", str(prov))
        assert result.exit_code == 2 and why in result.output, (name, result.output)
    assert invoke("site", "site-1", "--dir", str(prov)).exit_code == 0
    result = invoke("site", "site-1", "--dir", str(prov))
    assert result.exit_code == 2 and "--force" in result.output
    assert invoke("site", "site-1", "--dir", str(prov), "--force").exit_code == 0
    assert invoke("init", "--federation", "clinic", "--out", str(prov), "--force").exit_code == 0
    assert (prov / "ca" / "ca.crt").read_bytes() != ca_before
    assert not (prov / "sites" / "site-1").exists()


def test_cli_entry_point_reports_usage_errors(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedge.cli.main", "provision", "site", "site-1", "--dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "fedge provision init" in out.stderr


def test_generated_acl_grants_by_identity():
    from server.provision import acl_text

    acl = acl_text("secure")
    assert "user server\ntopic readwrite fedge/secure/#" in acl
    assert "pattern write fedge/secure/round/+/update/%u/+" in acl
    assert "pattern readwrite fedge/secure/status/%u" in acl
    assert "pattern read fedge/secure/#" not in acl  # sites read only what the server publishes
