"""`fedge profiles list|show|detect`: the shipped device profiles and which one fits this host.

Exit codes: 0 ok; 2 usage error (Typer); 3 profile not found or invalid (names the field).
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from device_profiles import Profile, ProfileError, load_profile_file, resolve_profile_path, shipped_names
from device_profiles.detect import detect

app = typer.Typer(help="Device profiles: spec sheet, site link and agent defaults per device class.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


class ShowFormat(str, Enum):
    yaml = "yaml"
    table = "table"
    source = "source"


def _load_or_exit(name_or_path: str) -> tuple[Profile, Path]:
    try:
        path = resolve_profile_path(name_or_path)
        return load_profile_file(path), path
    except ProfileError as exc:
        errors.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(ProfileError.exit_code) from None


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


@app.command("list")
def list_profiles() -> None:
    """Every shipped profile, one row each (`-` where the profile has no sourced figure)."""
    table = Table(title="fedge device profiles")
    for column in ("name", "kind", "arch"):
        table.add_column(column)
    for column in ("FP16 TFLOPS", "INT8 TOPS", "mem GB", "mem GB/s", "up Mbit/s", "down Mbit/s"):
        table.add_column(column, justify="right")
    for column in ("training", "export"):
        table.add_column(column)
    for name in shipped_names():
        p, _ = _load_or_exit(name)
        d = p.device
        table.add_row(
            p.name, d.kind, _fmt(d.gpu_arch), _fmt(d.fp16_tflops), _fmt(d.int8_tops), _fmt(d.memory_gb),
            _fmt(d.memory_bandwidth_gbs), _fmt(p.link.uplink_mbps), _fmt(p.link.downlink_mbps),
            p.defaults.training_mode, f"{p.defaults.export_format}/{p.defaults.export_precision}",
        )
    console.print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="shipped profile name, or a path to your own profile YAML")],
    fmt: Annotated[ShowFormat, typer.Option("--format", help="yaml: validated values; table; source: the file with its source comments")] = ShowFormat.yaml,
) -> None:
    """One profile, validated (a malformed file is reported field by field)."""
    profile, path = _load_or_exit(name)
    if fmt is ShowFormat.yaml:
        # Plain echo, not rich: rich wraps long lines, which would break the YAML.
        typer.echo(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False, width=10_000), nl=False)
    elif fmt is ShowFormat.source:
        typer.echo(path.read_text(encoding="utf-8"), nl=False)
    else:
        table = Table(title=f"{profile.name}: {profile.description}", show_header=False)
        table.add_column("field")
        table.add_column("value")
        for section in ("device", "link", "defaults"):
            for key, value in getattr(profile, section).model_dump(mode="json").items():
                table.add_row(f"{section}.{key}", _fmt(value))
        console.print(table)


@app.command("detect")
def detect_cmd(
    root: Annotated[Path, typer.Option(help="filesystem root to probe (a container's or chroot's view of the host)")] = Path("/"),
    as_json: Annotated[bool, typer.Option("--json", help="print the detection as JSON")] = False,
) -> None:
    """Which device this host is, what was found, and why that profile was chosen."""
    found = detect(root)
    if as_json:
        console.print_json(json.dumps(dataclasses.asdict(found)))
        return
    table = Table(title="fedge profiles detect", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key in ("profile", "kind", "found", "source", "reason"):
        table.add_row(key, getattr(found, key))
    console.print(table)
