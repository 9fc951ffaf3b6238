"""Installing the agent on a device: `fedge agent init` (config from a device profile) and
`fedge agent install-service` (systemd unit), checked by content, by `systemd-analyze verify` where
it runs, and by starting the written config against a real Mosquitto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from device_profiles import load_profile
from device_profiles.detect import detect
from device_profiles.loader import SHIPPED_DIR
from edge_client.config import AgentConfig
from edge_client.service import ServiceError, check_user, fedge_executable, quote, render_unit
from fedge.cli.agent import app
from fedge.protocol import StatusMessage, Topics, open_record
from fedge.transport import MqttSession

runner = CliRunner()


def _init(tmp_path: Path, *extra: str, out: str = "agent.yaml") -> tuple[int, str, Path]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    args = ["init", "--broker", "mqtt://broker.hospital.local:1883", "--site", "site-a", "--data-dir", str(data), "--out", str(tmp_path / out), *extra]
    result = runner.invoke(app, args)
    return result.exit_code, result.output, tmp_path / out


def test_init_takes_codec_and_chunk_size_from_the_profile(tmp_path: Path) -> None:
    profile = load_profile("jetson-orin-nano-8gb")

    code, output, path = _init(tmp_path, "--profile", "jetson-orin-nano-8gb")

    assert code == 0, output
    config = AgentConfig.from_yaml(path)
    assert config.codec == profile.defaults.codec and config.chunk_size == profile.defaults.chunk_size
    assert config.uplink_mbps is None and config.downlink_mbps is None  # no emulation unless asked
    assert config.data_dir == tmp_path / "data" and config.state_dir == tmp_path / "agent-state"
    assert path.read_text().startswith("# fedge agent config, written by `fedge agent init` from device profile jetson-orin-nano-8gb")


def test_emulate_link_copies_the_profile_link_rates(tmp_path: Path) -> None:
    link = load_profile("cpu-console").link

    code, output, path = _init(tmp_path, "--profile", "cpu-console", "--emulate-link")

    assert code == 0, output
    config = AgentConfig.from_yaml(path)
    assert (config.uplink_mbps, config.downlink_mbps) == (link.uplink_mbps, link.downlink_mbps)
    assert "20 Mbit/s emulated" in output


def test_detect_picks_this_hosts_profile(tmp_path: Path) -> None:
    expected = load_profile(detect().profile)

    code, output, path = _init(tmp_path)  # --profile detect is the default

    assert code == 0, output
    assert AgentConfig.from_yaml(path).codec == expected.defaults.codec
    assert f"from device profile {expected.name} (detected on this host" in path.read_text()


def test_a_user_profile_file_is_accepted(tmp_path: Path) -> None:
    data = yaml.safe_load((SHIPPED_DIR / "cpu-console.yaml").read_text())
    data["name"] = "our-console"
    data["defaults"] |= {"codec": "q8|zstd:5", "chunk_size": 65536}
    user_profile = tmp_path / "our-console.yaml"
    user_profile.write_text(yaml.safe_dump(data))

    code, output, path = _init(tmp_path, "--profile", str(user_profile))

    assert code == 0, output
    config = AgentConfig.from_yaml(path)
    assert (config.codec, config.chunk_size) == ("q8|zstd:5", 65536)


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    _init(tmp_path, "--profile", "cpu-console")
    before = (tmp_path / "agent.yaml").read_text()

    code, output, _ = _init(tmp_path, "--profile", "jetson-orin-nano-8gb")

    assert code == 2 and "pass --force" in output
    assert (tmp_path / "agent.yaml").read_text() == before
    assert _init(tmp_path, "--profile", "jetson-orin-nano-8gb", "--force")[0] == 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--profile", "no-such-device"], 3, "no shipped profile named 'no-such-device'"),
        (["--profile", "cpu-console", "--broker", "http://broker"], 2, "scheme must be mqtt:// or mqtts://"),
        (["--profile", "cpu-console", "--site", "site a"], 2, "--site: String should match pattern"),
    ],
)
def test_init_errors_name_the_problem(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = runner.invoke(app, ["init", "--broker", "mqtt://b:1883", "--site", "s", "--data-dir", str(tmp_path), "--out", str(tmp_path / "a.yaml"), *args])

    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "a.yaml").exists()


@pytest.fixture()
def unit(tmp_path: Path) -> tuple[Path, Path, str]:
    _, _, config = _init(tmp_path, "--profile", "cpu-console")
    out = tmp_path / "fedge-agent.service"
    result = runner.invoke(app, ["install-service", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, config, result.output


@pytest.mark.integration
def test_unit_runs_the_config_as_an_unprivileged_user_and_restarts_on_failure(unit: tuple[Path, Path, str]) -> None:
    out, config, output = unit

    lines = out.read_text().splitlines()

    fedge = fedge_executable()
    assert fedge.is_absolute() and os.access(fedge, os.X_OK)
    assert f"ExecStart={fedge} agent run --config {config}" in lines
    assert "Restart=on-failure" in lines and "User=fedge" in lines
    assert f"WorkingDirectory={config.parent}" in lines
    assert f"ReadWritePaths=-{config.parent / 'agent-state'}" in lines  # the one place it writes, even below /etc
    assert "WantedBy=multi-user.target" in lines and "After=network-online.target" in lines
    assert "sudo systemctl enable --now fedge-agent" in output


def _systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze not found (systemd is not installed here)")
    probe = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze does not run here: {probe.stderr.strip()}")
    return binary


def _verify(unit_path: Path) -> None:
    proc = subprocess.run([_systemd_analyze(), "verify", str(unit_path)], capture_output=True, text=True, check=False)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if unit_path.name in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


@pytest.mark.integration
def test_unit_passes_systemd_analyze_verify(unit: tuple[Path, Path, str]) -> None:
    _verify(unit[0])


def test_paths_with_spaces_and_percent_signs_survive_systemd_parsing(tmp_path: Path) -> None:
    tools = tmp_path / "my tools 100%"
    tools.mkdir()
    (tools / "fedge").symlink_to(fedge_executable())
    config = tmp_path / "site a" / "agent 50%.yaml"
    out = tmp_path / "fedge-agent.service"

    out.write_text(render_unit(config, user="fedge", site="a", federation="demo", fedge=tools / "fedge", state_dir=tmp_path / "state 1"))

    assert f'ExecStart="{tmp_path}/my tools 100%%/fedge" agent run --config "{tmp_path}/site a/agent 50%%.yaml"' in out.read_text()
    assert f'ReadWritePaths="-{tmp_path}/state 1"' in out.read_text()
    _verify(out)  # would report "not executable" / "not absolute" if the quoting split a path


@pytest.mark.parametrize(("user", "message"), [("root", "unprivileged"), ("Bad User", "not a valid user name"), ("-x", "not a valid user name")])
def test_privileged_or_malformed_users_are_refused(user: str, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        check_user(user)


def test_install_service_errors_exit_2(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["install-service", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "u.service")])
    _, _, config = _init(tmp_path, "--profile", "cpu-console")
    as_root = runner.invoke(app, ["install-service", "--config", str(config), "--user", "root", "--out", str(tmp_path / "u.service")])

    assert missing.exit_code == 2 and "cannot read agent config" in missing.output
    assert as_root.exit_code == 2 and "unprivileged" in as_root.output
    assert not (tmp_path / "u.service").exists()


def test_quote_leaves_plain_arguments_alone() -> None:
    assert quote("/usr/bin/fedge") == "/usr/bin/fedge"
    assert quote("$HOME") == "$$HOME"
    with pytest.raises(ServiceError, match="line break"):
        quote("a\nb")


@pytest.mark.mosquitto
def test_the_written_config_runs_an_agent_that_reaches_the_broker(
    mosquitto_broker: tuple[str, int],
    medmnist_root: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    host, port = mosquitto_broker
    config = tmp_path / "agent.yaml"
    args = ["init", "--profile", "cpu-console", "--broker", f"mqtt://{host}:{port}", "--site", "site-a", "--federation", "installtest",
            "--data-dir", str(medmnist_root), "--out", str(config)]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    watcher = MqttSession(f"mqtt://{host}:{port}", "installtest-watcher", clean_session=True).connect(timeout=10)
    watcher.subscribe(Topics("installtest").status("site-a"))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedge"), "agent", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        state = None
        while state != "online" and time.monotonic() < deadline and proc.poll() is None:
            msg = watcher.get(timeout=1)
            if msg is not None and msg.payload:
                state = open_record(msg.payload, StatusMessage, None, federation="installtest", sender="site-a").state

        assert state == "online", proc.stderr.read().decode() if proc.poll() is not None else "no online status within 90 s"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        watcher.close()
