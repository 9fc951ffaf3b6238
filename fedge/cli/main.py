"""Entry point: registers each command module. Keep imports here light: `fedge --help` loads no torch."""

from __future__ import annotations

import importlib

import typer

from fedge.errors import EXIT_CODES

app = typer.Typer(
    name="fedge",
    help="Federated learning at the hospital edge: train together over MQTT, keep images on site.",
    epilog="Exit codes (every command):\n\n" + "\n\n".join(f"{code}  {meaning}" for code, meaning in EXIT_CODES.items()),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# (module, attribute, name): a Typer app is mounted as a command group, a function as a command.
_COMMANDS: list[tuple[str, str, str]] = [
    ("fedge.cli.demo", "demo", "demo"),
    ("fedge.cli.server", "server", "server"),
    ("fedge.cli.agent", "app", "agent"),
    ("fedge.cli.keys", "keys", "keys"),
    ("fedge.cli.provision", "app", "provision"),
    ("fedge.cli.ingest", "ingest", "ingest"),
    ("fedge.cli.profiles", "app", "profiles"),
    ("fedge.cli.export", "export", "export"),
    ("fedge.cli.compress", "compress", "compress"),
    ("fedge.cli.pretrain", "pretrain", "pretrain"),
    ("fedge.cli.bench", "bench", "bench"),
]

for module_name, attr, name in _COMMANDS:
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, typer.Typer):
        app.add_typer(target, name=name)
    else:
        app.command(name)(target)


if __name__ == "__main__":
    app()
