"""Which device are we on? Jetson (device tree or L4T release file), else an NVIDIA GPU (torch.cuda,
then nvidia-smi), else a CPU console; mapped to the closest shipped profile, with the reason.

File locations hang off an injectable `root` so tests feed real files from a temporary folder.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEVICE_TREE_MODEL = Path("proc/device-tree/model")
TEGRA_RELEASE = Path("etc/nv_tegra_release")

# (pattern on the device-tree model string, profile, note); first match wins, so specific before general.
_JETSON_MODELS: tuple[tuple[str, str, str], ...] = (
    (r"agx\s+orin", "jetson-agx-orin-64gb", "AGX Orin module (32GB variants share the profile; figures are the 64GB's)"),
    (r"orin\s+nx", "jetson-orin-nx-16gb", "Orin NX module (8GB variant shares the profile; figures are the 16GB's)"),
    (r"orin\s+nano", "jetson-orin-nano-8gb", "Orin Nano module (4GB variant shares the profile; figures are the 8GB's)"),
    (r"orin", "jetson-orin-nano-8gb", "unrecognised Orin module; the smallest Orin profile is the safe choice"),
    (r"agx\s+xavier|jetson-agx", "jetson-agx-xavier-32gb", "AGX Xavier module"),
    (r"xavier", "jetson-agx-xavier-32gb", "Xavier module without its own profile; AGX Xavier figures overstate it"),
    (r"jetson", "jetson-orin-nano-8gb", "Jetson module without its own profile; nearest shipped is the smallest Orin"),
)


@dataclass(frozen=True)
class Detection:
    """What was found on this host and which shipped profile fits it best."""

    profile: str
    kind: str
    found: str
    source: str
    reason: str


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect(root: Path = Path("/"), *, use_torch: bool = True, nvidia_smi: str | None = "nvidia-smi") -> Detection:
    """Probe the host. `root` prefixes the Jetson files; `nvidia_smi` is the binary to try (None skips it)."""
    checked = [str(root / DEVICE_TREE_MODEL), str(root / TEGRA_RELEASE)]
    checked += ["torch.cuda"] if use_torch else []
    checked += [nvidia_smi] if nvidia_smi else []
    return (
        _detect_jetson(root)
        or _detect_gpu(use_torch, nvidia_smi)
        or Detection(
            profile="cpu-console",
            kind="cpu",
            found="no Jetson and no NVIDIA GPU",
            source="checked " + ", ".join(checked),
            reason="nothing GPU-capable was found, so this host is treated as a CPU-only console",
        )
    )


def _read_text(path: Path) -> str | None:
    try:
        # The device-tree string ends with a NUL byte.
        return path.read_bytes().decode("utf-8", errors="replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def _detect_jetson(root: Path) -> Detection | None:
    model_file = root / DEVICE_TREE_MODEL
    model = _read_text(model_file)
    if model and re.search("jetson|tegra|orin|xavier", model, re.IGNORECASE):
        for pattern, profile, note in _JETSON_MODELS:
            if re.search(pattern, model, re.IGNORECASE):
                return Detection(profile, "jetson", model, str(model_file), f"device-tree model matches {pattern!r}: {note}")
    release_file = root / TEGRA_RELEASE
    release = _read_text(release_file)
    if release is None:
        return None
    first_line = release.splitlines()[0]
    match = re.search(r"#\s*R(\d+)", first_line)
    major = int(match.group(1)) if match else None
    if major is not None and major <= 32:
        profile, why = "jetson-agx-xavier-32gb", f"L4T R{major} predates Orin, so this is a Xavier-class (or older) module"
    else:
        profile, why = "jetson-orin-nano-8gb", (f"L4T R{major if major is not None else '?'} names no module; the smallest Orin profile is the safe choice")
    return Detection(profile, "jetson", first_line, str(release_file), f"no device-tree model; {why}")


def _detect_gpu(use_torch: bool, nvidia_smi: str | None) -> Detection | None:
    name, source = None, ""
    if use_torch:
        name, source = _torch_gpu_name(), "torch.cuda"
    if name is None and nvidia_smi is not None:
        name, source = _nvidia_smi_gpu_name(nvidia_smi), nvidia_smi
    if name is None:
        return None
    if re.search(r"rtx\s*4090", name, re.IGNORECASE):
        reason = "the GPU is an RTX 4090"
    else:
        reason = "rtx-4090-workstation is the only discrete-GPU profile; its figures are not this GPU's"
    return Detection("rtx-4090-workstation", "gpu", name, source, reason)


def _torch_gpu_name() -> str | None:
    try:
        import torch  # lazy: `fedge profiles list` and `--help` must not pay for torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def _nvidia_smi_gpu_name(binary: str) -> str | None:
    executable = shutil.which(binary)
    if executable is None:
        return None
    try:
        out = subprocess.run([executable, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return names[0] if names else None
