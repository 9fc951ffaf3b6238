"""Option parsing shared by commands."""

from __future__ import annotations

import json
from typing import Any

import typer

MODE_OPTIONS_HELP = (
    "Mode options as KEY=VALUE pairs. lora: r, alpha, dropout, targets (layer names, e.g. "
    "'targets=[\"qkv\"]'; default every Linear/Conv2d but the head), train_norms, freeze_a; "
    "pruned: ratio, round_to. E.g. 'r=8,alpha=16' or 'ratio=0.5'"
)


def parse_mode_options(text: str | None) -> dict[str, Any]:
    """`r=8,alpha=16,targets=["qkv","proj"]` -> dict; values are JSON where they parse, else strings."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split(text or ""))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"mode option {item!r} is not KEY=VALUE, e.g. --mode-options r=8,alpha=16")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options


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
