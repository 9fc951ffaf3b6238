"""`fedge profiles list|show|detect`: the shipped device profiles and which one fits this host.

Exit codes: 0 ok; 2 usage error, or an invalid profile (the message names the field); 3 profile not found.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from device_profiles import Profile, ProfileError, load_profile_file, resolve_profile_path, shipped_names
from device_profiles.detect import detect
from fedge.cli.options import fail_with

app = typer.Typer(help="Device profiles: spec sheet, site link and agent defaults per device class.", no_args_is_help=True)
console = Console()


class ShowFormat(str, Enum):
    yaml = "yaml"
    table = "table"
    source = "source"


def _load_or_exit(name_or_path: str) -> tuple[Profile, Path]:
    try:
        path = resolve_profile_path(name_or_path)
        return load_profile_file(path), path
    except ProfileError as exc:
        raise fail_with(exc) from None


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def _profiles_table(profiles: list[Profile], hardware: bool) -> Table:
    caption = None if hardware else "spec-sheet figures: fedge profiles show NAME --format table"
    table = Table(title="fedge device profiles", caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True)
    table.add_column("kind (arch)" if hardware else "kind", no_wrap=True)
    figures = ("FP16 TFLOPS", "INT8 TOPS", "mem GB", "GB/s") if hardware else ()
    for column in (*figures, "up/down Mbit/s"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("training", no_wrap=True)
    table.add_column("export", no_wrap=True)
    for p in profiles:
        d = p.device
        kind = d.kind if d.gpu_arch is None or not hardware else f"{d.kind} ({d.gpu_arch})"
        values = (d.fp16_tflops, d.int8_tops, d.memory_gb, d.memory_bandwidth_gbs) if hardware else ()
        link = f"{_fmt(p.link.uplink_mbps)}/{_fmt(p.link.downlink_mbps)}"
        table.add_row(p.name, kind, *map(_fmt, values), link, p.defaults.training_mode, f"{p.defaults.export_format} {p.defaults.export_precision}")
    return table


@app.command("list")
def list_profiles() -> None:
    """Every shipped profile, one row each (`-` where the profile has no sourced figure)."""
    profiles = [_load_or_exit(name)[0] for name in shipped_names()]
    table = _profiles_table(profiles, hardware=True)
    if console.measure(table, options=console.options.update_width(10_000)).maximum > console.width:
        # The name is what a user copies into --profile: never cut it (80 columns when piped).
        # Narrow: the spec-sheet figures give way; `show NAME` has every field.
        table = _profiles_table(profiles, hardware=False)
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
