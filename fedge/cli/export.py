"""`fedge export`: write an inference artifact (ONNX, int8 QDQ ONNX, TensorRT engine, Triton repository)
from a checkpoint, and prove it matches the PyTorch model on the test set (DIR/export_report.json).

Exit codes: 0 exported and checked; 1 written, but the parity check failed (see the report);
2 usage error (bad option, checkpoint that does not match its config, missing data); 3 device profile
not found or invalid; 4 export or structural check failed; 5 unsupported operator; 6 calibration data
missing or unusable.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from fedge.cli.options import fail

if TYPE_CHECKING:
    import numpy as np
    from rich.console import Console


class Format(str, Enum):
    onnx = "onnx"
    onnx_int8 = "onnx-int8"
    tensorrt = "tensorrt"
    triton = "triton"


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def _calibration(path: Path) -> np.ndarray | Path:
    """An npz goes to the exporters as is; a folder is a DICOM dataset store read through edge_client."""
    if not path.is_dir():
        return path
    from exporters import CalibrationError

    try:
        from edge_client.ingest.store import DatasetStore
    except ImportError as exc:
        raise CalibrationError(f"{path} is a folder, but DICOM ingest (edge_client.ingest) is not available here; pass an npz") from exc
    try:
        arrays = DatasetStore.open(path).as_arrays(labelled_only=False)
    except (FileNotFoundError, ValueError) as exc:
        raise CalibrationError(str(exc)) from exc
    images = arrays.get("train_images")
    if images is None or len(images) == 0:
        raise CalibrationError(f"{path} holds no train-split images to calibrate on; ingest some with `fedge ingest DIR --store {path}`")
    return images


def _default_calibration(console: Console, splits: Any, precision: str) -> np.ndarray | None:
    """Without --calib, int8 calibrates on the dataset's train split (the site's own data, never the test set)."""
    if precision != "int8":
        return None
    console.print(f"calibrating int8 on {splits.name}'s train split ({len(splits.images['train'])} images); --calib picks other data")
    return splits.images["train"]


def _profile_precision(name: str, fmt: Format) -> tuple[str, str | None]:
    """The profile's name and export precision; the profile's format only supplies a default precision."""
    from device_profiles import load_profile

    profile = load_profile(name)
    wanted = profile.defaults.export_precision if profile.defaults.export_format == fmt.value or fmt is Format.triton else None
    return profile.name, wanted


def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors) written by fedge."),
    format: Format = typer.Option(..., "--format", help="Artifact to write."),
    out: Path = typer.Option(..., "--out", help="Output folder (the Triton model repository for --format triton)."),
    precision: Optional[PrecisionChoice] = typer.Option(
        None, "--precision", help="Default: the profile's, else onnx fp32, onnx-int8 int8, tensorrt fp16, triton fp32."
    ),
    calib: Optional[Path] = typer.Option(None, "--calib", help="int8 calibration images: an npz (e.g. the dataset's .npz) or a DICOM store folder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="MedMNIST subset whose test split checks parity (default: the checkpoint's)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder holding <dataset>.npz (or set FEDGE_DATA_DIR)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Device profile name or YAML path (precision default, engine target)."),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Batch sizes the artifact serves (engine profile, Triton batching)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch and onnxruntime alike in the latency check."),
) -> None:
    """Export a checkpoint for real-time inference and check it against PyTorch (export_report.json)."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise fail(f"--batch-sizes {batch_sizes!r} must be integers separated by commas, e.g. 1,8,32", 2) from None

    from exporters import REPORT_NAME, ExportError, ExportSpec, export_model, get_exporter, load_calibration
    from fedge.checkpoint import load_checkpoint
    from fedge.data import load_medmnist

    chosen = precision.value if precision else None
    profile_name = None
    if profile:
        from device_profiles import ProfileError

        try:
            profile_name, from_profile = _profile_precision(profile, format)
        except ProfileError as exc:
            raise fail(str(exc), ProfileError.exit_code) from None
        chosen = chosen or from_profile
    exporter = get_exporter(format.value)
    chosen = chosen or exporter.default_precision
    if chosen not in exporter.precisions:
        raise fail(f"--format {format.value} exports {', '.join(exporter.precisions)}, not {chosen}; change --precision", 2)
    try:
        ckpt = load_checkpoint(checkpoint)
        model = ckpt.build()
        name = dataset or ckpt.meta.get("dataset")
        if not name:
            raise ValueError(f"{checkpoint} does not name its dataset; pass --dataset NAME (the MedMNIST subset it was trained on)")
        splits = load_medmnist(str(name), data_dir)
        spec = ExportSpec(
            precision=chosen,  # type: ignore[arg-type]
            batch_sizes=sizes,
            calib=load_calibration(_calibration(calib)) if calib is not None else _default_calibration(console, splits, chosen),
            profile=profile_name,
            threads=threads,
        )
        with console.status(f"fedge export {format.value}") as status:
            result = export_model(
                model, ckpt.config, format.value, out, spec, (splits.images["test"], splits.labels["test"]),
                on_step=lambda msg: status.update(f"fedge export {format.value}: {msg}"),
            )
    except ExportError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc), 2) from None
    _print_report(console, result.report, out / REPORT_NAME)
    if not result.passed:
        raise fail(f"parity check failed ({result.report['checks']}); the artifact is written but must not be deployed", 1)


def _print_report(console: Console, report: dict[str, Any], path: Path) -> None:
    from rich.table import Table

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    table = Table(title=f"fedge export {report['format']} ({report['precision']}) -> {path}")
    for column in ("max |diff|", f"{report['metric']['name']} torch", "exported", "delta", "p50 torch ms", "p50 exported ms", "speedup", "bytes", "passed"):
        table.add_column(column, justify="right")
    lat = report["latency_ms"]
    table.add_row(
        f"{report['max_abs_diff']:.2e}",
        num(report["metric"]["torch"], ".4f"),
        num(report["metric"]["exported"], ".4f"),
        num(report["metric"]["delta"], "+.4f"),
        f"{lat['torch_eager']['p50']:.3f}",
        f"{lat['exported']['p50']:.3f}",
        f"{report['speedup_p50']:.1f}x",
        str(report["bytes"]),
        "yes" if report["passed"] else "NO",
    )
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
