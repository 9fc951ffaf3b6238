"""DICOM ingest throughput (images/s) on the 28-slice GE head CT: read, decode, window, resize, store.

Each run ingests the series into a fresh store through the same Ingestor the CLI uses (no progress
bar); one untimed warm-up run first pays the imports. A second number is the re-run of an
already-ingested folder, where known instances are skipped from the header alone.

    python benchmarks/ingest.py --report reports/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_client.ingest.pipeline import Ingestor, discover
from edge_client.ingest.reader import ReadConfig
from edge_client.ingest.store import DatasetStore
from fedge.data.medmnist import default_data_dir

SERIES = ("ct", "ge_head_human_28slice")


def run_once(files: list[Path], size: int, root: Path) -> tuple[float, float]:
    """Seconds for a first ingest, and for a re-run of the same files (all duplicates)."""
    store = DatasetStore.create(root, size, 1)
    first = Ingestor(store, ReadConfig(image_size=size)).ingest_paths(files, progress=False)
    if first.ingested != len(files):
        raise RuntimeError(f"expected {len(files)} images, ingested {first.ingested}: {first.reasons}")
    again = Ingestor(store, ReadConfig(image_size=size)).ingest_paths(files, progress=False)
    return first.seconds, again.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="data root holding ct/ (default FEDGE_DATA_DIR, else ../shared/data)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", type=Path, default=Path("reports/ingest.json"))
    args = parser.parse_args()
    folder = args.data_dir.joinpath(*SERIES)
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found: pass --data-dir (the data root holding ct/ge_head_human_28slice) or set FEDGE_DATA_DIR")
    warnings.filterwarnings("ignore", module="pydicom")
    files = discover(folder)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run_once(files, args.sizes[0], Path(tmp) / "warmup")
        for size in args.sizes:
            timings = [run_once(files, size, Path(tmp) / f"s{size}-{r}") for r in range(args.repeats)]
            first = [t[0] for t in timings]
            rerun = [t[1] for t in timings]
            results.append(
                {
                    "image_size": size,
                    "images": len(files),
                    "seconds": first,
                    "images_per_s_median": round(len(files) / statistics.median(first), 1),
                    "images_per_s_best": round(len(files) / min(first), 1),
                    "rerun_files_per_s_median": round(len(files) / statistics.median(rerun), 1),
                }
            )
    import torch

    report = {
        "schema_version": 1,
        "benchmark": "ingest",
        "series": "/".join(SERIES),
        "source": "512x512 int16 CT, Explicit VR Little Endian, 526 KB per file",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=f"ingest throughput: {report['series']}")
    for column in ("size", "images", "images/s (median)", "images/s (best)", "re-run files/s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(str(r["image_size"]), str(r["images"]), str(r["images_per_s_median"]), str(r["images_per_s_best"]), str(r["rerun_files_per_s_median"]))
    Console().print(table)
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
