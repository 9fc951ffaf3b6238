"""`fedge export`: write an inference artifact (ONNX, int8 QDQ ONNX, TensorRT engine, Triton repository)
from a checkpoint, and prove it matches the PyTorch model on the test set (DIR/export_report.json).

Exit codes (`fedge --help` lists them all): 0 exported and checked; 2 usage error (bad option, a
checkpoint that does not match its config); 3 checkpoint, dataset or device profile not found;
4 export or structural check failed; 5 unsupported operator; 6 calibration data missing or
unusable; 7 written, but the parity check failed (see the report).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from fedge.cli.options import fail, fail_with
from fedge.precision import Precision

if TYPE_CHECKING:
    import numpy as np
    from rich.console import Console

    from fedge.checkpoint import Checkpoint


class Format(str, Enum):
    """The exporters' registry names (a test keeps them equal); an Enum so `--help` lists them without importing torch."""

    onnx = "onnx"
    onnx_int8 = "onnx-int8"
    tensorrt = "tensorrt"
    triton = "triton"


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


def _profile_precision(name: str, fmt: Format) -> tuple[str, str | None]:
    """The profile's name and export precision; the profile's format only supplies a default precision."""
    from device_profiles import load_profile

    profile = load_profile(name)
    wanted = profile.defaults.export_precision if profile.defaults.export_format == fmt.value or fmt is Format.triton else None
    return profile.name, wanted


def _parity_data(console: Console, ckpt: Checkpoint, dataset: str | None, data_dir: Path | None, precision: str) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """(images, labels, splits) the parity check runs on. fp32 compares logits, so without a dataset
    (none named, or the checkpoint's own not at hand) seeded random images do; other precisions
    compare the task metric and need the labelled test split."""
    from exporters.parity import synthetic_images
    from fedge.data import load_medmnist

    name = dataset or ckpt.meta.get("dataset")
    if name is None and precision == "fp32":
        console.print("no dataset named: checking fp32 parity on seeded random images (--dataset NAME also checks the metric)")
        return synthetic_images(ckpt.config), None, None
    if name is None:
        raise fail(f"{precision} parity compares the task metric on a test split: pass --dataset NAME (the MedMNIST subset it was trained on)")
    try:
        splits = load_medmnist(str(name), data_dir)
    except FileNotFoundError as exc:
        if dataset is not None or precision != "fp32":
            raise
        console.print(f"{name} not found ({exc}); checking fp32 parity on seeded random images instead", markup=False, highlight=False)
        return synthetic_images(ckpt.config), None, None
    return splits.images["test"], splits.labels["test"], splits


def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors) written by fedge: a round, final or pretrained one."),
    format: Format = typer.Option(..., "--format", help="Artifact to write."),
    out: Path = typer.Option(..., "--out", help="Output folder (the Triton model repository for --format triton)."),
    precision: Optional[Precision] = typer.Option(
        None, "--precision", help="Default: the profile's, else onnx fp32, onnx-int8 int8, tensorrt fp16, triton fp32."
    ),
    calib: Optional[Path] = typer.Option(None, "--calib", help="int8 calibration images: an npz (e.g. the dataset's .npz) or a DICOM store folder."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="MedMNIST subset whose test split checks parity (default: the checkpoint's; fp32 works without one)."
    ),
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
        raise fail(f"--batch-sizes {batch_sizes!r} must be integers separated by commas, e.g. 1,8,32") from None

    from exporters import REPORT_NAME, ExportSpec, export_model, get_exporter, load_calibration
    from fedge.checkpoint import load_checkpoint
    from fedge.errors import FedgeError, ParityError

    try:
        # Every option is checked before the checkpoint and the dataset are read.
        profile_name, from_profile = _profile_precision(profile, format) if profile else (None, None)
        exporter = get_exporter(format.value)
        chosen = precision or from_profile or exporter.default_precision
        if chosen not in exporter.precisions:
            raise fail(f"--format {format.value} exports {', '.join(exporter.precisions)}, not {chosen}; change --precision")
        spec = ExportSpec(precision=chosen, batch_sizes=sizes, profile=profile_name, threads=threads)  # type: ignore[arg-type]
        calib_images = load_calibration(_calibration(calib)) if calib is not None and chosen == "int8" else None
        ckpt = load_checkpoint(checkpoint)
        model = ckpt.build()
        images, labels, splits = _parity_data(console, ckpt, dataset, data_dir, chosen)
        if chosen == "int8" and calib_images is None:
            # Without --calib, int8 calibrates on the dataset's train split (the site's own data, never the test set).
            calib_images = splits.images["train"]
            console.print(f"calibrating int8 on {splits.name}'s train split ({len(calib_images)} images); --calib picks other data")
        spec = dataclasses.replace(spec, calib=calib_images)
        with console.status(f"fedge export {format.value}") as status:
            result = export_model(
                model, ckpt.config, format.value, out, spec, (images, labels),
                on_step=lambda msg: status.update(f"fedge export {format.value}: {msg}"),
            )  # fmt: skip
    except (FedgeError, ValueError, OSError) as exc:
        raise fail_with(exc) from None
    _print_report(console, result.report, out / REPORT_NAME)
    if not result.passed:
        raise fail(f"parity check failed ({result.report['checks']}); the artifact is written but must not be deployed", ParityError.exit_code)


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
