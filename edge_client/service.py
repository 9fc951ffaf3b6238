"""A systemd unit that runs the agent from its config file: restarted on failure, as an unprivileged
user, with the absolute path of the `fedge` executable so the unit does not depend on PATH."""

from __future__ import annotations

import pwd
import re
import shutil
import sys
from pathlib import Path

UNIT_NAME = "fedge-agent.service"
RESTART_SEC = 15
# POSIX-portable user names (useradd's default NAME_REGEX), at most 32 characters.
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,30}[$]?$")


class ServiceError(ValueError):
    """The unit cannot be written as asked. The CLI exits with `exit_code`."""

    exit_code = 2


def fedge_executable() -> Path:
    """The `fedge` script of the running installation: beside this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "fedge"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("fedge")
    if found:
        return Path(found).absolute()
    raise ServiceError(f"no fedge executable beside {sys.executable} or on PATH; install fedge (pip install fedge) or pass --fedge /absolute/path/to/fedge")


def check_user(user: str) -> None:
    """An unprivileged account name: valid syntax, never root, never an account with uid 0."""
    if not _USER.match(user):
        raise ServiceError(f"--user {user!r} is not a valid user name (lowercase letters, digits, '_' and '-', starting with a letter or '_')")
    if user == "root":
        raise ServiceError("--user root: the agent must run as an unprivileged user (e.g. --user fedge)")
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return  # created later with useradd; the printed instructions say how
    if uid == 0:
        raise ServiceError(f"--user {user} has uid 0 (root privileges); choose an unprivileged account")


def quote(arg: str, *, command: bool = True) -> str:
    """One word of a systemd setting, escaped: '%' specifiers (and, in a command line, '$'
    variables) are literal, and words with spaces or quotes are double-quoted."""
    if any(c in arg for c in "\n\r\x00"):
        raise ServiceError(f"{arg!r} contains a line break or NUL byte; systemd unit lines cannot hold it")
    escaped = arg.replace("%", "%%")
    if command:
        escaped = escaped.replace("$", "$$")
    if re.search(r'[\s"\'\\;]', escaped) or not escaped:
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def _path_setting(path: Path) -> str:
    """A path for settings such as WorkingDirectory= (absolute, '%' escaped; spaces are fine there)."""
    text = str(path)
    if any(c in text for c in "\n\r\x00"):
        raise ServiceError(f"{text!r} contains a line break or NUL byte")
    return text.replace("%", "%%")


def render_unit(config_path: Path, *, user: str, site: str, federation: str, fedge: Path, state_dir: Path) -> str:
    """The unit text. Paths must be absolute (the unit runs from any directory); `state_dir` is the
    one place the agent writes, kept writable under ProtectSystem=full (e.g. below /etc)."""
    check_user(user)
    for what, path in (("config", config_path), ("fedge executable", fedge), ("state", state_dir)):
        if not path.is_absolute():
            raise ServiceError(f"the {what} path {path} must be absolute in a systemd unit")
    exec_start = " ".join(quote(a) for a in (str(fedge), "agent", "run", "--config", str(config_path)))
    return f"""\
# Written by `fedge agent install-service`. Install it with:
#   sudo cp {UNIT_NAME} /etc/systemd/system/
#   sudo systemctl daemon-reload && sudo systemctl enable --now fedge-agent
# Logs: journalctl -u fedge-agent -f
[Unit]
Description=fedge federated-learning agent (site {site}, federation {federation})
After=network-online.target
Wants=network-online.target
# Keep retrying while the broker is unreachable, however long that lasts.
StartLimitIntervalSec=0

[Service]
Type=simple
User={user}
WorkingDirectory={_path_setting(config_path.parent)}
ExecStart={exec_start}
Restart=on-failure
RestartSec={RESTART_SEC}
Environment=PYTHONUNBUFFERED=1
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
ReadWritePaths={quote("-" + str(state_dir), command=False)}

[Install]
WantedBy=multi-user.target
"""
