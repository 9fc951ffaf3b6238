"""Option parsing shared by commands."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

if TYPE_CHECKING:
    from device_profiles.detect import Detection
    from device_profiles.schema import Profile

P = ParamSpec("P")
R = TypeVar("R")

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


STRATEGY_HELP = (
    "Aggregation rule: fedavg, clipping, median, trimmed_mean, multikrum, centered_clipping (robust), "
    "dp_fedavg (client-level central DP), fedprox, fedbn, fedadam, fedyogi, scaffold (non-IID sites); see --strategy-options"
)
STRATEGY_OPTIONS_HELP = (
    "Strategy options as KEY=VALUE pairs. clipping: max_norm (default: median norm x multiplier), multiplier, weighted; "
    "trimmed_mean: beta; multikrum: f, selected; centered_clipping: iterations, tau; dp_fedavg: noise_multiplier, "
    "max_norm, delta, sample_rate; fedprox: mu; fedadam, fedyogi: lr, beta1, beta2, tau. E.g. 'beta=0.1' or 'noise_multiplier=1.1,max_norm=1.0'"
)
FILM_HELP = "ldct: condition the denoiser on each scan's protocol (FiLM scales and shifts from (I0, views))"
IMAGE_SIZE_HELP = "ldct: resample CT slices to this many pixels before the simulation (default 128; agents set image_size in their YAML)"
LR_SCHEDULE_HELP = "Each round's announced lr: constant (--lr every round) or cosine (from --lr in round 1 towards 0 in the last)"
AUGMENT_HELP = (
    "Sites flip each training image left-right at random and shift it by up to 3 pixels (classification only; "
    "for small sets such as BreastMNIST's 546 images, where a CNN otherwise overfits within a few epochs)"
)
LOCAL_OPTIMIZER_HELP = (
    "The sites' local optimizer: adam (restarted each round; --lr 1e-3) or sgd (momentum 0.9; give a larger --lr, e.g. 0.2). "
    "Under strong label skew sgd lets a site with little left to learn move little, where Adam moves every site about --lr a step"
)
CALIBRATE_HEAD_HELP = (
    "After the last round, one head-calibration round: no training; each site sends its class counts, class feature "
    "sums and feature Gram matrix for the final model (lossless, about 34 kB for the cnn), and the server refits the "
    "classifier head as LDA on their sum (measured in the BreastMNIST Dirichlet-0.5 simulation: FedAvg 0.870 to 0.894 AUC; docs/noniid.md). "
    "Classifiers in mode full, pruned or qat; not with robust strategies, dp_fedavg, fedbn, DP-SGD or async rounds; "
    "on a finished federation's --checkpoint-dir it runs just that round"
)
LOGIT_ADJUST_HELP = (
    "Label skew: each site trains on logits + TAU * log(its own class frequencies) (logit adjustment), so a site "
    "with, say, 9 benign images to each malignant one does not teach the shared model its prior; 1.0 is the usual TAU, "
    "0 is off (classification only; pairs well with --strategy scaffold)"
)
DP_HELP = (
    "Record-level DP: DP-SGD at every site with this noise multiplier (opacus; SGD with momentum 0.9 at --lr, "
    "e.g. --lr 0.5; the cnn is then built with GroupNorm). Pair it with a dense codec such as --codec 'q8,ef|zstd': "
    "top-k of a DP-SGD delta sends mostly noise"
)


def parse_strategy_options(text: str | None) -> dict[str, Any]:
    """`beta=0.1` -> {"beta": 0.1}; the strategy checks names and values (get_strategy)."""
    return parse_key_values(_split(text or ""), "--strategy-options beta=0.1")


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
    """The documented exit code (fedge.errors.EXIT_CODES) of a caught error: fedge's own carry
    theirs; a missing file is 3, other OS and network errors 8, a ValueError a usage error (2),
    anything else unexpected (1)."""
    from fedge.errors import FedgeError, NotFoundError, StorageError, UsageError

    if isinstance(exc, FedgeError):
        return exc.exit_code
    if isinstance(exc, FileNotFoundError):
        return NotFoundError.exit_code
    if isinstance(exc, OSError):
        return StorageError.exit_code
    if isinstance(exc, ValueError):
        return UsageError.exit_code
    return 1


def fail_with(exc: BaseException) -> typer.Exit:
    """`fail` for a caught error: its message (a validation error's first problem, on one line) and its exit code; raise the result."""
    from pydantic import ValidationError

    from fedge.protocol.errors import first_error

    return fail(first_error(exc) if isinstance(exc, ValidationError) else str(exc), exit_code_for(exc))


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorator for long-running commands (`fedge server`): a known error (fedge's own, a bad
    value, a file or broker that is not there) ends the command with one line and its documented
    exit code instead of a traceback; the traceback still goes to the log at DEBUG level."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        from fedge.errors import FedgeError

        try:
            return command(*args, **kwargs)
        except (FedgeError, ValueError, OSError) as exc:
            logging.getLogger(command.__module__).debug("%s stopped", command.__name__, exc_info=True)
            raise fail(" ".join(str(exc).split()) or type(exc).__name__, exit_code_for(exc)) from None

    return run


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
