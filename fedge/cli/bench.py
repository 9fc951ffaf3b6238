"""`fedge bench`: measure a device profile on this host (inference latency per backend, a local
training step per mode, bytes per round and their projected transfer time on the profile's link) and
write a JSON report with a Markdown table and a PNG chart beside it; the roofline estimate is kept apart.

Exit codes: 0 measured; 2 usage error (bad option, unreadable checkpoint, report path, invalid
device profile); 3 checkpoint or device profile not found.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from fedge.cli.options import fail, fail_with, resolve_profile

if TYPE_CHECKING:
    from rich.console import Console


def bench(
    profile: str = typer.Option(..., "--profile", help="Shipped profile name (fedge profiles list), a path to your profile YAML, or `detect`."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Model to measure; default: a small CNN (28x28x1, 2 classes), random init."),
    report: Path = typer.Option(Path("bench.json"), "--report", help="JSON report; the Markdown table (.md) and PNG chart (.png) go beside it."),
    batch: Optional[int] = typer.Option(None, "--batch", help="The larger inference batch and the training batch (default: the profile's batch size)."),
    iters: int = typer.Option(100, "--iters", help="Timed inference runs per backend and batch."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed runs before timing."),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch and onnxruntime (1, like the agent's default)."),
    modes: Optional[str] = typer.Option(None, "--modes", help="Training modes to measure, comma-separated (default: every registered mode)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed training steps per mode (after one untimed)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with MedMNIST npz files (else FEDGE_DATA_DIR, else ../shared/data)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Use synthetic images even where MedMNIST is on disk."),
    seed: int = typer.Option(0, "--seed", help="Seed of the default model's init and of the codec."),
) -> None:
    """Measure what a device profile means on this host and write the report (JSON, .md, .png)."""
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    errors = Console(stderr=True)
    if report.suffix in (".md", ".png"):
        raise fail(f"--report {report} would be overwritten by its own Markdown/PNG; name the JSON file, e.g. bench.json")

    from device_profiles.bench import BenchSettings, run_bench
    from device_profiles.bench_report import write_report

    prof, _ = resolve_profile(profile)
    try:
        settings = BenchSettings(
            profile=prof, checkpoint=checkpoint, batch=batch, iters=iters, warmup=warmup, threads=threads,
            modes=None if modes is None else tuple(m.strip() for m in modes.split(",") if m.strip()),
            repeats=repeats, data_dir=data_dir, synthetic=synthetic, seed=seed,
        )  # fmt: skip
    except ValueError as exc:
        raise fail(f"{exc}; see fedge bench --help") from None
    # torch.onnx warns about optional torchvision ops on every export; none of them is used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=errors, transient=False) as progress:
        task = progress.add_task(f"fedge bench {prof.name}", total=None)

        def on_step(label: str, done: int, total: int) -> None:
            progress.update(task, description=f"fedge bench {prof.name}: {label}", completed=done, total=total)

        try:
            result = run_bench(settings, on_step)
        except (ValueError, FileNotFoundError) as exc:
            raise fail_with(exc) from None
    paths = write_report(result, report)
    _print_summary(Console(), result)
    errors.print(f"report: {paths['json']}  table: {paths['markdown']}  chart: {paths['png']}", markup=False, highlight=False, soft_wrap=True)


def _print_summary(console: Console, result: dict[str, Any]) -> None:
    from rich.table import Table

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    data = result["data"]
    title = f"fedge bench {result['profile']} (measured on this host, {result['settings']['threads']} thread(s); data: {data['kind']})"
    table = Table(title=title)
    for column in ("backend", "batch", "p50 ms", "p95 ms", "p99 ms", "throughput /s"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in result["inference"]:
        table.add_row(r["backend"], str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p95_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['throughput']:,.1f}")
    console.print(table)
    table = Table(title="local training step (measured)")
    for column in ("mode", "device", "step s", "peak MB", "measure"):
        table.add_column(column, justify="left" if column in ("mode", "device", "measure") else "right")
    for r in result["training"]:
        table.add_row(r["mode"], r["device"], f"{r['step_seconds']:.4f}", f"{r['peak_mem_mb']:.1f}", r["memory"])
    console.print(table)
    bw = result["bandwidth"]
    console.print(
        f"bytes per round ({bw['codec']}): up {num(bw['uplink_bytes'], ',')} B -> {num(bw['uplink_seconds'], '.4f')} s, "
        f"down {num(bw['downlink_bytes'], ',')} B -> {num(bw['downlink_seconds'], '.4f')} s (projected on the profile's link)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    est = result["estimate"]
    lat = ", ".join(f"batch {r['batch']}: {num(r['latency_ms'], '.4f')} ms" for r in est["batches"])
    missing = f" (profile lacks {', '.join(est['missing'])})" if est["missing"] else ""
    console.print(f"ESTIMATE (roofline on {est['device']}, not measured): {lat}{missing}", markup=False, highlight=False, soft_wrap=True)
    for r in result["unavailable"]:
        console.print(f"not measured: {r.get('backend') or 'training ' + r['mode']}: {r['reason']}", markup=False, highlight=False, soft_wrap=True)
