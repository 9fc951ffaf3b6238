"""Hospital brokers bridged to a central one (`fedge provision broker --bridge`): what the generated
configs let through, and a federation over two bridged hospitals whose link is cut mid-round."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from brokers import current_user, running_mosquitto
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.broker import free_port
from server.bridge import provision_bridge
from server.provision import ProvisionError, init_federation, provision_site, write_broker_config


def _federation(root: Path, sites: tuple[str, ...]) -> Path:
    fed = init_federation("bridged", root / "pki")
    for site in sites:
        provision_site(fed.dir, site)
    return fed.dir


def _directives(conf: Path, name: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in conf.read_text().splitlines() if line.startswith(name + " ")]


def test_the_bridge_forwards_only_its_hospitals_sites_up_and_only_the_servers_topics_down(tmp_path) -> None:
    pki = _federation(tmp_path, ("a-1", "a-2", "b-1"))
    files = provision_bridge(pki, "hospital-a", ["a-1", "a-2"], tmp_path / "a", central="central.example:8883", listen="127.0.0.1")
    root = "fedge/bridged"
    assert sorted(_directives(files.config, "topic")) == sorted([
        f"{root}/round/+/update/a-1/+ out 1", f"{root}/status/a-1 out 1",
        f"{root}/round/+/update/a-2/+ out 1", f"{root}/status/a-2 out 1",
        f"{root}/round/+/global in 1", f"{root}/round/+/global/+ in 1", f"{root}/snapshot in 1", f"{root}/snapshot/+ in 1",
        f"{root}/control in 1",
    ])  # fmt: skip
    assert _directives(files.config, "address") == ["central.example:8883"]
    assert _directives(files.config, "bridge_insecure") == ["false"] and _directives(files.config, "cleansession") == ["false"]
    cert = x509.load_pem_x509_certificate(Path(_directives(files.config, "bridge_certfile")[0]).read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bridge-hospital-a"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The hospital's ACL: only its own sites write, each its own topics; nobody reads an update.
    acl = files.acl.read_text()
    assert "user a-1\ntopic write fedge/bridged/round/+/update/a-1/+\n" in acl and "b-1" not in acl
    assert "pattern write" not in acl and not any("update" in line for line in acl.splitlines() if "read" in line.split(" ")[:2])
    # The central ACL, written afterwards, lets the bridge write its sites' topics and nothing else.
    central = write_broker_config(pki, tmp_path / "central").acl.read_text()
    block = central.split("user bridge-hospital-a\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [f"topic write {root}/round/+/update/a-1/+", f"topic write {root}/status/a-1",
                     f"topic write {root}/round/+/update/a-2/+", f"topic write {root}/status/a-2"]  # fmt: skip


def test_bridge_provisioning_refuses_what_would_widen_a_hospitals_reach(tmp_path) -> None:
    pki = _federation(tmp_path, ("a-1", "b-1"))
    provision_bridge(pki, "hospital-a", ["a-1"], tmp_path / "a", central="127.0.0.1:8883")
    with pytest.raises(ProvisionError, match="another hospital"):
        provision_bridge(pki, "hospital-b", ["b-1", "a-1"], tmp_path / "b", central="127.0.0.1:8883")
    with pytest.raises(ProvisionError, match="not provisioned"):
        provision_bridge(pki, "hospital-b", ["b-9"], tmp_path / "b", central="127.0.0.1:8883")
    with pytest.raises(ProvisionError, match="reserved for hospital brokers"):
        provision_site(pki, "bridge-hospital-a")  # would be granted the bridge's identity at the central broker
    with pytest.raises(ProvisionError, match="HOST:PORT"):
        provision_bridge(pki, "hospital-b", ["b-1"], tmp_path / "b", central="127.0.0.1:http")


class Link:
    """The hospital's WAN link as a TCP relay to the central broker: `cut()` drops every connection
    and refuses new ones (the bridge keeps retrying) until `restore()`."""

    def __init__(self, target_port: int):
        self.port, self.target = free_port(), target_port
        self._up = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.settimeout(0.1)
        self._up.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self._up.clear()  # the accept loop closes its listener within 0.1 s (the bridge retries after 1 s)
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._up.is_set():
                try:
                    near, _ = listener.accept()
                except TimeoutError:
                    continue
                far = socket.create_connection(("127.0.0.1", self.target))
                with self._lock:
                    self._sockets += [near, far]
                for a, b in ((near, far), (far, near)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.01)


@pytest.mark.integration
@pytest.mark.mosquitto
def test_two_bridged_hospitals_federate_and_a_cut_link_loses_no_update(tmp_path, medmnist_root) -> None:
    from edge_client.agent import Agent
    from edge_client.config import AgentConfig
    from fedge.data import load_medmnist
    from fedge.models import ModelConfig
    from fedge.tasks import ClassificationTask
    from server.config import ServerConfig
    from server.provision import load_federation
    from server.rounds import RoundServer

    sites = {"hospital-1": "h1-site", "hospital-2": "h2-site"}
    pki = _federation(tmp_path, tuple(sites.values()))
    fed = load_federation(pki)
    central_port = free_port()
    link = Link(central_port)  # hospital-1 reaches the central broker through it; hospital-2 directly
    ports = {h: free_port() for h in sites}
    hospitals = {
        h: provision_bridge(pki, h, [site], tmp_path / h, central=f"127.0.0.1:{link.port if h == 'hospital-1' else central_port}",
                            port=ports[h], listen="127.0.0.1", user=current_user(), restart_timeout=1)
        for h, site in sites.items()
    }  # fmt: skip
    central = write_broker_config(pki, tmp_path / "central", port=central_port, listen="127.0.0.1", user=current_user())
    task = ClassificationTask(load_medmnist("breastmnist", medmnist_root))
    model = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})
    records: list[dict] = []
    server = RoundServer(ServerConfig(
        federation=fed.name, broker=f"mqtts://127.0.0.1:{central_port}", model=model, checkpoint_dir=tmp_path / "ckpt", rounds=2,
        min_clients=2, expected_clients=tuple(sorted(sites.values())), round_timeout=600, wait_for_clients=60,
        trusted_keys=fed.trusted_keys, signing_key=fed.server_signing_key, ca=fed.server_ca, cert=fed.server_cert, key=fed.server_tls_key,
    ), on_round=records.append)  # fmt: skip
    agents = {}
    for h, site in sites.items():
        kit = fed.kit(site)
        config = AgentConfig(broker=f"mqtts://127.0.0.1:{ports[h]}", site=site, federation=fed.name, state_dir=tmp_path / site,
                             signing_key=kit.signing_key, server_key=kit.server_key, ca=kit.ca, cert=kit.cert, key=kit.key)  # fmt: skip
        agents[h] = Agent(config, task, range(256))  # type: ignore[arg-type]  # ~0.3 s of training: time to cut the link
    errors: list[BaseException] = []

    def run(target) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        return thread

    with running_mosquitto(central.config, central_port, tmp_path / "central.log"), \
            running_mosquitto(hospitals["hospital-1"].config, ports["hospital-1"], tmp_path / "h1.log"), \
            running_mosquitto(hospitals["hospital-2"].config, ports["hospital-2"], tmp_path / "h2.log"):  # fmt: skip
        threads = [run(server.run)] + [run(agent.run) for agent in agents.values()]
        h1 = agents["hospital-1"]
        # Round 2 reached hospital-1 through the link: cut it before the site has trained and sent.
        _wait(lambda: h1.pending is not None and h1.pending.round == 2, "round 2 announced at hospital-1")
        link.cut()
        assert h1.answered is None or h1.answered.round < 2
        _wait(lambda: h1.answered is not None and h1.answered.round == 2, "hospital-1's site sent its round-2 update")
        time.sleep(1.0)  # the update waits in hospital-1's broker: the server cannot have it
        assert server.state.round == 1 and records[-1]["round"] == 1
        link.restore()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "the federation did not finish after the link came back"
        _a_foreign_site_writes_nothing_through_the_bridge(fed, ports["hospital-1"], central_port)
    assert not errors, errors
    assert [r["clients"] for r in records] == [["h1-site", "h2-site"]] * 2
    assert server.refusals.total == 0 and all(a.refusals.total == 0 for a in agents.values())
    assert all(a.rounds_done == [1, 2] and a.finished for a in agents.values())


def test_cli_writes_a_hospital_broker_and_names_what_it_needs(tmp_path) -> None:
    from typer.testing import CliRunner

    from fedge.cli.main import app

    pki = _federation(tmp_path, ("a-1",))
    base = ["provision", "broker", "--dir", str(pki), "--out", str(tmp_path / "a"), "--bridge", "hospital-a"]
    result = CliRunner().invoke(app, base + ["--sites", "a-1"])
    assert result.exit_code == 2 and "--central" in result.output
    result = CliRunner().invoke(app, base + ["--sites", "a-1", "--central", "central.example:8883", "--host", "mqtt.hospital-a.example"])
    assert result.exit_code == 0, result.output
    assert "fedge provision broker --dir" in result.output  # the central config must be re-written to let the bridge in
    sans = x509.load_pem_x509_certificate((tmp_path / "a" / "broker.crt").read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "mqtt.hospital-a.example" in sans.value.get_values_for_type(x509.DNSName)


def _a_foreign_site_writes_nothing_through_the_bridge(fed, hospital_port: int, central_port: int) -> None:
    """hospital-2's site on hospital-1's broker: its own update topic, hospital-1's site's and a server
    topic are all denied there; hospital-1's site's own update, sent after them, reaches the central broker."""
    from fedge.transport import MqttSession, TlsFiles

    def session(identity: str, port: int) -> MqttSession:
        if identity == "server":
            tls = TlsFiles(fed.server_ca, fed.server_cert, fed.server_tls_key)
        else:
            kit = fed.kit(identity)
            tls = TlsFiles(kit.ca, kit.cert, kit.key)
        return MqttSession(f"mqtts://127.0.0.1:{port}", identity, clean_session=True, tls=tls)

    root = f"fedge/{fed.name}/round/9"
    observer = session("server", central_port)
    observer.subscribe(f"{root}/#")
    observer.connect()
    foreign, own = session("h2-site", hospital_port).connect(), session("h1-site", hospital_port).connect()
    try:
        for topic in (f"{root}/update/h2-site/0", f"{root}/update/h1-site/0", f"{root}/global"):
            foreign.publish(topic, b"from another hospital's site")
        own.publish(f"{root}/update/h1-site/0", b"from hospital-1's site")
        seen: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 30
        while (f"{root}/update/h1-site/0", b"from hospital-1's site") not in seen:
            assert time.monotonic() < deadline, f"hospital-1's site's own update never reached the central broker: {seen}"
            msg = observer.get(timeout=0.1)
            if msg is not None:
                seen.append((msg.topic, msg.payload))
        while (msg := observer.get(timeout=0.5)) is not None:
            seen.append((msg.topic, msg.payload))
        assert seen == [(f"{root}/update/h1-site/0", b"from hospital-1's site")]
    finally:
        for s in (foreign, own, observer):
            s.close()
