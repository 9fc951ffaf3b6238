"""Writing a `fedge bench` report: the JSON, a Markdown table file and a PNG chart beside it.

Measured figures and the roofline estimate stay in separate tables and separate chart panels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedge.files import atomic_write_bytes


def _num(value: float | None, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value:,} B ({value / scale:.2f} {unit})"
    return f"{value:,} B"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A GitHub Markdown table; the first `text_columns` are left-aligned, the rest (numbers) right."""

    def cells(row: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    rule = "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"
    return [cells(header), rule] + [cells(row) for row in rows]


def markdown(report: dict[str, Any]) -> str:
    host, settings, model, data = report["host"], report["settings"], report["model"], report["data"]
    out = [
        f"# fedge bench: profile `{report['profile']}`",
        "",
        (
            f"Measured on this host: {host['cpu']} ({host['usable_cpus']} usable CPUs, {settings['threads']} thread(s) used), "
            f"{host['memory_gb']} GB RAM, GPU: {host['cuda_device'] or 'none'}; torch {host['torch']}, "
            f"onnxruntime {host['onnxruntime'] or 'not installed'}, TensorRT {host['tensorrt'] or 'not installed'}. "
            f"Detected profile for this host: `{host['detected_profile']}`."
        ),
        "",
        f"Model: {model['arch']} ({model['params']:,} parameters, input {'x'.join(map(str, model['input_shape']))}), {model['source']}. "
        + (
            f"Data: MedMNIST {data['dataset']} ({data['path']})."
            if data["kind"] == "medmnist"
            else f"Data: **synthetic images** ({data['reason']}); {data['note']}."
        ),
        "",
        f"## Inference (measured; {settings['iters']} timed runs after {settings['warmup']} warm-up)",
        "",
    ]
    out += _table(
        ["backend", "batch", "p50 ms", "p95 ms", "p99 ms", "throughput /s"],
        [[r["backend"], str(r["batch"]), _num(r["p50_ms"]), _num(r["p95_ms"]), _num(r["p99_ms"]), _num(r["throughput"], ",.1f")] for r in report["inference"]],
    )
    out += ["", "## Local training step (measured)", ""]
    out += _table(
        ["mode", "device", "memory measure", "batch", "step s", "peak memory MB", "trainable params"],
        [
            [r["mode"], r["device"], r["memory"], str(r["batch"]), _num(r["step_seconds"], ".4f"), _num(r["peak_mem_mb"], ".1f"), f"{r['trainable_params']:,}"]
            for r in report["training"]
        ],
        text_columns=3,
    )
    bw = report["bandwidth"]
    out += ["", "## Bytes per round (measured) and transfer time (projected on the profile's link)", ""]
    out += _table(
        ["direction", "codec", "bytes", "link Mbit/s", "projected s"],
        [
            ["uplink (one site's update)", f"`{bw['codec']}`", _bytes(bw["uplink_bytes"]), _num(bw.get("uplink_mbps"), "g"), _num(bw["uplink_seconds"], ".4f")],
            [
                "downlink (full global model)",
                f"`{bw.get('downlink_codec', '-')}`",
                _bytes(bw["downlink_bytes"]),
                _num(bw.get("downlink_mbps"), "g"),
                _num(bw["downlink_seconds"], ".4f"),
            ],
        ],
        text_columns=2,
    )
    if bw.get("uplink_bytes"):
        out += [
            "",
            (
                f"Uplink delta: {bw['training_mode']} mode after {bw['local_steps']} local steps on {bw['local_samples']} images; "
                f"{_bytes(bw['dense_fp32_bytes'])} as dense fp32, {bw['compression_ratio']:.1f}x smaller after the codec. {bw['note']}."
            ),
        ]
    est = report["estimate"]
    out += ["", f"## Roofline estimate for {est['device']} ({est['precision']}): an estimate, not a measurement", ""]
    out += _table(
        ["batch", "GFLOP", "MB moved", "compute ms", "memory ms", "latency ms", "throughput /s", "bound"],
        [
            [
                str(r["batch"]),
                _num(r["flops"] / 1e9, ".4f"),
                _num(r["bytes"] / 1e6, ".3f"),
                _num(r["compute_ms"], ".4f"),
                _num(r["memory_ms"], ".4f"),
                _num(r["latency_ms"], ".4f"),
                _num(r["throughput"], ",.0f"),
                r["bound"] or "-",
            ]
            for r in est["batches"]
        ],
        text_columns=0,
    )
    if est["missing"]:
        out += ["", f"The profile has no sourced figure for {', '.join(est['missing'])}, so no latency is estimated."]
    if report["unavailable"]:
        out += ["", "## Not measured here", ""]
        out += _table(["what", "reason"], [[r.get("backend") or f"training: {r['mode']}", r["reason"]] for r in report["unavailable"]], text_columns=2)
    out += ["", f"Bench took {report['seconds']:.1f} s.", ""]
    return "\n".join(out)


def plot(report: dict[str, Any], path: Path) -> None:
    """Three measured panels (latency by backend and batch, throughput, training step) and, apart,
    the roofline estimate when the profile has the figures for one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    est_rows = [r for r in report["estimate"]["batches"] if r["latency_ms"] is not None]
    panels = 4 if est_rows else 3
    fig = Figure(figsize=(5 * panels, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    fig.suptitle(f"fedge bench: profile {report['profile']} (measured on {report['host']['cpu']}, {report['settings']['threads']} thread(s))")

    inference = report["inference"]
    batches = sorted({r["batch"] for r in inference})
    backends = list(dict.fromkeys(r["backend"] for r in inference))
    width = 0.8 / max(1, len(batches))
    for i, batch in enumerate(batches):
        rows = {r["backend"]: r for r in inference if r["batch"] == batch}
        xs = [j + i * width for j, b in enumerate(backends) if b in rows]
        p50 = [rows[b]["p50_ms"] for b in backends if b in rows]
        p99 = [rows[b]["p99_ms"] for b in backends if b in rows]
        axes[0].bar(xs, p50, width, label=f"batch {batch} p50")
        axes[0].scatter(xs, p99, marker="_", s=200, color="black", zorder=3, label="p99" if i == 0 else None)
        axes[1].bar(xs, [rows[b]["throughput"] for b in backends if b in rows], width, label=f"batch {batch}")
    for ax, title, unit in ((axes[0], "inference latency (measured)", "ms"), (axes[1], "inference throughput (measured)", "images / s")):
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(backends))], backends, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)

    training = report["training"]
    modes = [r["mode"] for r in training]
    ax = axes[2]
    ax.bar(modes, [r["step_seconds"] for r in training], color="tab:green")
    ax.set_ylabel("seconds per step")
    ax.set_title(f"local training step (measured, batch {training[0]['batch'] if training else '-'})")
    twin = ax.twinx()
    twin.plot(modes, [r["peak_mem_mb"] for r in training], "o", color="tab:red")
    twin.set_ylabel("peak memory MB (red dots)")
    twin.set_ylim(bottom=0)

    if est_rows:
        ax = axes[3]
        ax.bar([str(r["batch"]) for r in est_rows], [r["latency_ms"] for r in est_rows], color="tab:gray", hatch="//")
        ax.set_xlabel("batch")
        ax.set_ylabel("ms")
        ax.set_title(f"ESTIMATE: roofline on {report['estimate']['device']}", fontsize=10)
    fig.savefig(path, dpi=100)


def write_report(report: dict[str, Any], path: str | Path) -> dict[str, Path]:
    """JSON at `path`, Markdown and PNG beside it (same stem); returns the three paths."""
    path = Path(path)
    paths = {"json": path, "markdown": path.with_suffix(".md"), "png": path.with_suffix(".png")}
    if path.suffix in (".md", ".png"):
        raise ValueError(f"--report {path} would be overwritten by its own Markdown/PNG; name the JSON file, e.g. bench.json")
    atomic_write_bytes(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(paths["markdown"], markdown(report).encode())
    plot(report, paths["png"])
    return paths
