"""Device detection from real files under a fake root (device tree, L4T release, an nvidia-smi script)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_profiles import shipped_names
from device_profiles.detect import DEVICE_TREE_MODEL, TEGRA_RELEASE, detect
from fedge.cli.profiles import app


def _place(root: Path, relative: Path, content: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _fake_nvidia_smi(tmp_path: Path, gpu_name: str) -> str:
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\necho '{gpu_name}'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.mark.parametrize(
    ("model", "profile"),
    [
        ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano-8gb"),
        ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "jetson-orin-nano-8gb"),
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "jetson-orin-nx-16gb"),
        ("Jetson AGX Orin Developer Kit", "jetson-agx-orin-64gb"),
        ("Jetson-AGX", "jetson-agx-xavier-32gb"),
        ("NVIDIA Jetson Xavier NX Developer Kit", "jetson-agx-xavier-32gb"),
        ("NVIDIA Jetson Nano Developer Kit", "jetson-orin-nano-8gb"),
    ],
)
def test_jetson_model_from_device_tree(tmp_path: Path, model: str, profile: str) -> None:
    source = _place(tmp_path, DEVICE_TREE_MODEL, model.encode() + b"\x00")

    found = detect(tmp_path, use_torch=False, nvidia_smi=None)

    assert (found.profile, found.kind, found.found, found.source) == (profile, "jetson", model, str(source))
    assert found.profile in shipped_names()
    assert "device-tree model matches" in found.reason


@pytest.mark.parametrize(("release", "profile"), [("R36", "jetson-orin-nano-8gb"), ("R32", "jetson-agx-xavier-32gb")])
def test_jetson_from_l4t_release_when_no_device_tree(tmp_path: Path, release: str, profile: str) -> None:
    line = f"# {release} (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 2025"
    _place(tmp_path, TEGRA_RELEASE, (line + "\n# KERNEL_VARIANT: oot\n").encode())

    found = detect(tmp_path, use_torch=False, nvidia_smi=None)

    assert (found.profile, found.kind, found.found) == (profile, "jetson", line)
    assert found.reason.startswith(f"no device-tree model; L4T {release}")


def test_non_jetson_device_tree_is_ignored(tmp_path: Path) -> None:
    _place(tmp_path, DEVICE_TREE_MODEL, b"Raspberry Pi 4 Model B Rev 1.4\x00")

    found = detect(tmp_path, use_torch=False, nvidia_smi=None)

    assert found.profile == "cpu-console"


@pytest.mark.parametrize(
    ("gpu", "reason"),
    [("NVIDIA GeForce RTX 4090", "the GPU is an RTX 4090"), ("NVIDIA H100 80GB HBM3", "only discrete-GPU profile")],
)
def test_gpu_from_nvidia_smi(tmp_path: Path, gpu: str, reason: str) -> None:
    smi = _fake_nvidia_smi(tmp_path, gpu)

    found = detect(tmp_path, use_torch=False, nvidia_smi=smi)

    assert (found.profile, found.kind, found.found, found.source) == ("rtx-4090-workstation", "gpu", gpu, smi)
    assert reason in found.reason


def test_falls_back_to_cpu_console_and_says_what_was_checked(tmp_path: Path) -> None:
    found = detect(tmp_path, use_torch=False, nvidia_smi=str(tmp_path / "no-such-nvidia-smi"))

    assert (found.profile, found.kind) == ("cpu-console", "cpu")
    assert str(tmp_path / DEVICE_TREE_MODEL) in found.source
    assert "no-such-nvidia-smi" in found.source


def test_cli_detect_prints_what_it_found_and_why(tmp_path: Path) -> None:
    _place(tmp_path, DEVICE_TREE_MODEL, b"NVIDIA Jetson Orin Nano Developer Kit\x00")

    result = CliRunner().invoke(app, ["detect", "--root", str(tmp_path), "--json"])

    assert result.exit_code == 0, result.output
    assert '"profile": "jetson-orin-nano-8gb"' in result.output
    assert '"found": "NVIDIA Jetson Orin Nano Developer Kit"' in result.output
    assert "device-tree model matches" in result.output
