"""Load a profile by shipped name or from a user's YAML file, with errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from device_profiles.schema import Profile
from fedge.errors import NotFoundError, UsageError

SHIPPED_DIR = Path(__file__).resolve().parent


class ProfileError(UsageError):
    """A profile that cannot be parsed or validated (exit 2); the message names the field."""


class ProfileNotFoundError(ProfileError, NotFoundError):
    """No shipped profile by that name, or no file at that path (exit 3)."""

    exit_code = NotFoundError.exit_code


def shipped_names() -> list[str]:
    """Names of the profiles that ship with fedge (one YAML file each)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate a shipped profile by name or a user profile by path."""
    return load_profile_file(resolve_profile_path(name_or_path))


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """The file behind a shipped name (`jetson-orin-nano-8gb`) or a path to a user YAML file.

    Anything with a path separator or a .yaml/.yml suffix is a file; anything else is a shipped
    name, so a stray file in the working directory never shadows a shipped profile.
    """
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or candidate.suffix in (".yaml", ".yml"):
        return candidate
    path = SHIPPED_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ProfileNotFoundError(
            f"no shipped profile named {text!r}; known: {', '.join(shipped_names())}. For your own profile, pass the path to its YAML file instead of a name."
        )
    return path


def load_profile_file(path: Path) -> Profile:
    """Read and validate one YAML file; every problem is reported as `file: field: problem`."""
    if not path.is_file():
        raise ProfileNotFoundError(f"{path}: profile file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a YAML mapping with keys device, link, defaults; got {type(data).__name__}")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  {_describe(err)}" for err in exc.errors())
        raise ProfileError(f"{path}: invalid profile ({exc.error_count()} problem(s)):\n{problems}") from None


def _describe(err: Any) -> str:
    """One pydantic error as `field.path: message (got VALUE)`, listing valid keys for unknown ones."""
    loc = tuple(err["loc"])
    field = ".".join(str(part) for part in loc) or "(profile)"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        message = f"unknown field; valid fields here: {', '.join(known)}"
    elif err["type"] == "value_error":
        message = str(err["ctx"]["error"])  # our validators' own sentences already name the value
    elif err["type"] != "missing" and not isinstance(err.get("input"), (dict, list)):
        message = f"{message} (got {err['input']!r})"
    return f"{field}: {message}"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model at `loc` (e.g. ("device",) -> Device's fields)."""
    model: type[BaseModel] = Profile
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)
