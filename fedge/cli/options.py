"""Option parsing shared by commands."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from device_profiles.detect import Detection
    from device_profiles.schema import Profile

MODE_OPTIONS_HELP = (
    "Mode options as KEY=VALUE pairs. lora: r, alpha, dropout, targets (layer names, e.g. "
    "'targets=[\"qkv\"]'; default every Linear/Conv2d but the head), train_norms, freeze_a; "
    "pruned: ratio, round_to. E.g. 'r=8,alpha=16' or 'ratio=0.5'"
)


def parse_key_values(items: list[str], example: str) -> dict[str, Any]:
    """`["r=8", 'targets=["qkv"]']` -> {"r": 8, "targets": ["qkv"]}: values are JSON where they
    parse, else strings. `example` completes the error message, e.g. "--option patch_size=8"."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in items)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE, e.g. {example}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options


def parse_mode_options(text: str | None) -> dict[str, Any]:
    """`r=8,alpha=16,targets=["qkv","proj"]` -> dict (commas inside brackets belong to the value)."""
    return parse_key_values(_split(text or ""), "--mode-options r=8,alpha=16")


def _split(text: str) -> list[str]:
    """Split on commas outside brackets, so list values survive."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def profile_link_rates(profile: str) -> dict[str, float | None]:
    """AgentConfig link-emulation fields from a device profile's site link."""
    from device_profiles.loader import load_profile

    link = load_profile(profile).link
    return {"uplink_mbps": link.uplink_mbps, "downlink_mbps": link.downlink_mbps}


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr (the message as is: paths and brackets are not markup); raise the result."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print("[red]error:[/red] ", end="")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code (fedge.errors.EXIT_CODES) of a known error."""
    from fedge.errors import FedgeError, NotFoundError, StorageError, UsageError

    if isinstance(exc, FedgeError):
        return exc.exit_code
    if isinstance(exc, FileNotFoundError):
        return NotFoundError.exit_code
    if isinstance(exc, OSError):
        return StorageError.exit_code
    return UsageError.exit_code


def fail_with(exc: BaseException) -> typer.Exit:
    """`fail` for a caught error: its message and its exit code; raise the result."""
    return fail(str(exc), exit_code_for(exc))


def resolve_profile(name: str) -> tuple[Profile, Detection | None]:
    """A shipped profile name, a YAML path, or `detect` (what it found goes to stderr); a profile
    that cannot be loaded fails with the loader's exit code."""
    from device_profiles import ProfileError, load_profile

    detected = None
    if name == "detect":
        from device_profiles.detect import detect

        detected = detect()
        name = detected.profile
        typer.echo(f"detected {detected.found}: profile {name} ({detected.reason})", err=True)
    try:
        return load_profile(name), detected
    except ProfileError as exc:
        raise fail_with(exc) from None
