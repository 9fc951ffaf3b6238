"""Export benchmark: train a quick classifier per architecture on a MedMNIST subset (or take a
checkpoint), export ONNX fp32 and int8 QDQ ONNX, and report parity and batch-1 latency against
torch eager fp32 at equal thread counts, in one run.

    python benchmarks/export.py --report runs/bench/export.json [--archs resnet,resnet-wide,vit] [--checkpoint CKPT]

resnet is the zoo default ResNet-8 (16-32-64 channels, ~77k params: batch-1 latency there is mostly
per-node dispatch); resnet-wide is the same family at a realistic width (32-64-128, two blocks per
stage, ~0.7M params).

Acceptance (issue 5): int8 AUC within 0.01 of torch fp32, and int8 p50 latency at batch 1 at least
3x lower than torch eager fp32 on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from device_profiles.detect import cpu_name
from exporters import export_artifact
from fedge.checkpoint import load_checkpoint, save_checkpoint
from fedge.data import load_medmnist
from fedge.files import atomic_write_bytes
from fedge.models import MODELS, build_model
from fedge.tasks import ClassificationTask

MAX_AUC_DROP = 0.01
MIN_SPEEDUP = 3.0
# Benchmark model name -> (zoo architecture, options); any other name is a zoo architecture at its defaults.
BENCH_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet-wide": ("resnet", {"widths": [32, 64, 128], "blocks": [2, 2, 2]}),
}
_CHUNK = 1024  # training images per timed step, so the time budget is kept to a few seconds


def train_quick(task: ClassificationTask, name: str, seconds: float, console: Console) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Train on chunks of the train split until `seconds` have passed (at least one chunk)."""
    arch, options = BENCH_MODELS.get(name, (name, {}))
    config = task.model_config(arch, **options)
    torch.manual_seed(0)
    model = build_model(config)
    n = len(task.splits.labels["train"])
    order = np.random.default_rng(0).permutation(n)
    start, seen, step = time.perf_counter(), 0, 0
    with Progress(TextColumn(f"training {name}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task(name, total=seconds, info="")
        while step == 0 or time.perf_counter() - start < seconds:
            idx = order[(step * _CHUNK) % n :][:_CHUNK]
            result = task.train_local(model, idx, epochs=1, seed=step)
            seen, step = seen + len(idx), step + 1
            bar.update(job, completed=min(time.perf_counter() - start, seconds), info=f"{seen / n:.2f} epochs, loss {result.loss:.3f}")
    params = sum(p.numel() for p in model.parameters())
    return model, config, {"arch": arch, "options": options, "params": params, "seconds": round(time.perf_counter() - start, 1), "epochs": round(seen / n, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    console = Console(stderr=True)
    splits = load_medmnist(args.dataset, args.data_dir)
    task = ClassificationTask(splits)
    test = (splits.images["test"], splits.labels["test"])
    out_root = Path(args.out_dir or Path(args.report).with_suffix(""))
    models: list[tuple[str, Path, dict[str, Any]]] = []
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        params = sum(p.numel() for p in ckpt.build().parameters())  # as train_quick counts (no BatchNorm statistics)
        models.append((ckpt.config.arch, Path(args.checkpoint), {"checkpoint": str(args.checkpoint), "params": params}))
    else:
        for arch in args.archs.split(","):
            if BENCH_MODELS.get(arch, (arch,))[0] not in MODELS:
                console.print(f"[yellow]skipping {arch}: not in the model zoo ({', '.join(sorted(MODELS))})[/yellow]")
                continue
            model, config, training = train_quick(task, arch, args.train_seconds, console)
            path = save_checkpoint(out_root / arch / "model.safetensors", model.state_dict(), config, dataset=args.dataset)
            models.append((arch, path, training))
    results = []
    for arch, path, training in models:
        entry: dict[str, Any] = {"arch": arch, "training": training, "exports": {}}
        for fmt in ("onnx", "onnx-int8"):
            with console.status(f"{arch}: {fmt}"):
                result = export_artifact(path, fmt, out_root / arch / fmt, calib=splits.images["train"], test_set=test, threads=args.threads)
            entry["exports"][fmt] = result.report
        int8 = entry["exports"]["onnx-int8"]
        entry["acceptance"] = {
            "onnx_fp32_max_abs_diff_le_1e-4": entry["exports"]["onnx"]["max_abs_diff"] <= 1e-4,
            "int8_auc_within_0.01": int8["metric"]["delta"] is not None and abs(int8["metric"]["delta"]) <= MAX_AUC_DROP,
            "int8_p50_speedup_ge_3x": int8["speedup_p50"] >= MIN_SPEEDUP,
        }
        results.append(entry)
    return {
        "benchmark": "export",
        "dataset": args.dataset,
        "test_samples": int(len(test[1])),
        "threads": {"torch": args.threads, "onnxruntime_intra_op": args.threads},
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "latency": "batch 1, p50/p95 over the exporter's iterations, torch eager (inference_mode) vs onnxruntime, same process, same input",
        "results": results,
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"export benchmark ({report['dataset']}, {report['threads']['torch']} thread(s), {report['cpu']})")
    for col in ("model", "params", "format", "AUC torch", "AUC exported", "delta", "max |diff|", "p50 torch ms", "p50 exported ms", "speedup", "bytes"):
        table.add_column(col, justify="right")
    for entry in report["results"]:
        for fmt, r in entry["exports"].items():
            m, lat = r["metric"], r["latency_ms"]
            table.add_row(
                entry["arch"],
                str(entry["training"].get("params", "")),
                fmt,
                f"{m['torch']:.4f}",
                f"{m['exported']:.4f}",
                f"{m['delta']:+.4f}",
                f"{r['max_abs_diff']:.1e}",
                f"{lat['torch_eager']['p50']:.3f}",
                f"{lat['exported']['p50']:.3f}",
                f"{r['speedup_p50']:.2f}x",
                str(r["bytes"]),
            )
    console.print(table)
    for entry in report["results"]:
        console.print(f"{entry['arch']}: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in entry["acceptance"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="JSON report path")
    parser.add_argument("--checkpoint", help="export this checkpoint instead of training")
    parser.add_argument(
        "--archs",
        default="resnet,resnet-wide,vit",
        help="models (resnet, resnet-wide, vit, cnn or any zoo architecture) to train and export (skips any not in the zoo)",
    )
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-dir", default=None, help="folder holding <dataset>.npz (or FEDGE_DATA_DIR)")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="training budget per architecture")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads for latency")
    parser.add_argument("--out-dir", default=None, help="artifacts folder (default: beside the report)")
    args = parser.parse_args()
    report = run(args)
    atomic_write_bytes(Path(args.report), (json.dumps(report, indent=2) + "\n").encode())
    print_table(report, Console(width=max(Console().width, 150)))


if __name__ == "__main__":
    main()
