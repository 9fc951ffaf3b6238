"""Federated low-dose CT denoising across sites with different scan protocols, on real CT.

The CT folder's slices are dealt to the sites (every S-th slice, 2 per site held out whole for
test); each site simulates its own protocol (photons I0, views, electronic noise) with
`fedge.data.ldct` (scikit-image radon/iradon, Poisson counts, FBP). Compared in one run, same seeds:
local-only (each site alone), FedAvg, FiLM (FedAvg of a protocol-conditioned RED-CNN), FedBN
(`server/strategies/fedbn.py`: normalization layers stay at the sites), and centralized training on
the pooled data. Federations are in-process (`server.simulation`): the task's local step, the real
codec, validation and strategy classes, without MQTT. Then the FedAvg model is exported to ONNX and
int8 QDQ ONNX (`exporters/`) and its PSNR measured through onnxruntime.

Report: {"results": [{"strategy", "site", "protocol", "psnr_in", "psnr_out", "ssim_in", "ssim_out"}],
"unseen_protocol": [{"strategy", "protocol", "psnr_in", "psnr_out", "ssim_in", "ssim_out"}],
"unseen_scanner": [{"strategy", "protocol", ...}] (with --eval-ct-dir), "export": {...}, "acceptance": {...}}
and a PNG beside it: low-dose input, each strategy's output and the reference, one test slice per site.
Metrics are PSNR/SSIM in HU over the body mask (data range 2000 HU). Local-only and FedBN have one
model per site: on the unseen protocol their numbers are the mean over the sites' models; on the
unseen scanner each protocol is denoised by the model of the site that scans with it.

    python benchmarks/ldct.py --report benchmarks/results/ldct.json --eval-ct-dir $FEDGE_DATA_DIR/dicom/ct_series_liver_3slice
    python benchmarks/ldct.py --report /tmp/l.json --rounds 2 --strategies fedavg local
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fedge.data.ldct import SITE_PROTOCOLS, UNSEEN_PROTOCOL, default_ct_dir

VARIANTS = ("local", "fedavg", "film", "fedbn", "centralized")
_CTX: dict[str, Any] = {}


def _series(folder: str):
    from edge_client.ingest.ct import read_ct_dir

    return read_ct_dir(folder)


def _setup(args: dict[str, Any]) -> dict[str, Any]:
    """Sites' tasks, the unseen-protocol and unseen-scanner sets (simulated once, cached on disk)."""
    from fedge.data.ldct import ScanProtocol, SimulationConfig
    from fedge.tasks.ldct import LdctTask, PairSet, eval_pairs

    sim = SimulationConfig(image_size=args["image_size"])
    cache = Path(args["cache_dir"])
    series = _series(args["ct_dir"])
    protocols = [ScanProtocol.parse(p) for p in args["protocols"]]
    sites = {
        f"site-{i + 1}": LdctTask.for_site(
            series, p, shard=i, num_shards=len(protocols), sim=sim, patch=args["patch"], stride=args["stride"], seed=args["seed"], cache_dir=cache
        )
        for i, p in enumerate(protocols)
    }
    unseen = ScanProtocol.parse(args["unseen_protocol"])
    held_out = [
        LdctTask.for_site(
            series, unseen, shard=i, num_shards=len(protocols), sim=sim, patch=args["patch"], stride=args["stride"], seed=args["seed"], cache_dir=cache
        ).test
        for i in range(len(protocols))
    ]
    scanner = {}
    if args["eval_ct_dir"]:
        other = _series(args["eval_ct_dir"])
        scanner = {site: eval_pairs(other, p, sim, seed=args["seed"], cache_dir=cache) for site, p in zip(sites, protocols)}
    return {"sites": sites, "protocols": dict(zip(sites, protocols)), "unseen": PairSet.concat(held_out), "scanner": scanner}


def _init_worker(args: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(1)
    _CTX.update(_setup(args))


def _model_options(job: dict[str, Any]) -> dict[str, Any]:
    return {"width": job["width"], "depth": job["depth"], "norm": job["norm"], **({"cond": 2} if job["variant"] == "film" else {})}


def _scores(models: dict[str, Any]) -> dict[str, Any]:
    """Each site's model on its own test slices, on the unseen protocol and on the unseen scanner
    (under the site's protocol), plus its output for the site's first test slice (the picture)."""
    from fedge.tasks.ldct import LdctTask, denoise_metrics

    out: dict[str, Any] = {}
    for site, model in models.items():
        task: LdctTask = _CTX["sites"][site]
        unseen, scanner = _CTX["unseen"], _CTX["scanner"].get(site)
        out[site] = {
            "own": task.evaluate(model),
            "unseen_protocol": denoise_metrics(unseen.normal, task.denoise(model, unseen.low, unseen.cond)),
            "unseen_scanner": denoise_metrics(scanner.normal, task.denoise(model, scanner.low, scanner.cond)) if scanner else None,
            "image": task.denoise(model, task.test.low[:1], task.test.cond[:1])[0],
        }
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fedge import weights as W
    from fedge.models import build_model
    from fedge.tasks.ldct import LdctTask
    from server.simulation import InProcessFederation, SimulationSettings
    from server.strategies import get_strategy

    cpu, started = time.process_time(), time.monotonic()
    sites: dict[str, LdctTask] = _CTX["sites"]
    any_task = next(iter(sites.values()))
    options = _model_options(job)
    rounds, epochs = job["rounds"], job["epochs"]
    weights: dict[str, np.ndarray] | None = None
    if job["variant"] in ("local", "centralized"):
        task = sites[job["site"]] if job["variant"] == "local" else LdctTask.pool(list(sites.values()))
        torch.manual_seed(job["seed"])
        model = build_model(task.model_config("redcnn", **options))
        task.train_local(model, epochs=rounds * epochs, lr=job["lr"], batch_size=job["batch_size"], seed=job["seed"])
        models = {job["site"]: model} if job["variant"] == "local" else dict.fromkeys(sites, model)
        nbytes = 0
    else:
        settings = SimulationSettings(
            sites=len(sites),
            rounds=rounds,
            codec=job["codec"],
            arch="redcnn",
            model_options=options,
            epochs=epochs,
            lr=job["lr"],
            batch_size=job["batch_size"],
            seed=job["seed"],
        )
        strategy = get_strategy("fedbn" if job["variant"] == "fedbn" else "fedavg")
        fed = InProcessFederation(settings, any_task, strategy, site_tasks=sites)
        history = [fed.round(r) for r in range(1, rounds + 1)]
        nbytes = int(statistics.fmean(h["uplink_bytes"] for h in history))
        local = getattr(fed, "site_local", {})
        models = {}
        for site in sites:
            model = build_model(any_task.model_config("redcnn", **options))
            W.load_float_state(model, fed.weights | local.get(site, {}))
            models[site] = model
        weights = fed.weights if job["variant"] == "fedavg" else None
    return {
        "variant": job["variant"],
        "site": job.get("site"),
        "scores": _scores(models),
        "uplink_bytes_per_round": nbytes,
        "weights": weights,
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.monotonic() - started,
    }


def _row(metrics_in: dict[str, float], metrics_out: dict[str, float]) -> dict[str, float]:
    return {"psnr_in": metrics_in["psnr"], "psnr_out": metrics_out["psnr"], "ssim_in": metrics_in["ssim"], "ssim_out": metrics_out["ssim"]}


def summarize(runs: list[dict[str, Any]], ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from fedge.tasks.ldct import denoise_metrics

    protocols = {site: str(p) for site, p in ctx["protocols"].items()}
    unseen_in = denoise_metrics(ctx["unseen"].normal, ctx["unseen"].low)
    scanner_in = {site: denoise_metrics(s.normal, s.low) for site, s in ctx["scanner"].items()}
    results, unseen, scanner = [], [], []
    for variant in args.strategies:
        scores: dict[str, Any] = {}
        for run in runs:
            if run["variant"] == variant:
                scores |= run["scores"]
        if not scores:
            continue
        for site in ctx["sites"]:
            own = scores[site]["own"]
            results.append({"strategy": variant, "site": site, "protocol": protocols[site], **_row({"psnr": own["psnr_in"], "ssim": own["ssim_in"]}, own)})
        mean = {k: statistics.fmean(scores[s]["unseen_protocol"][k] for s in ctx["sites"]) for k in ("psnr", "ssim")}
        unseen.append({"strategy": variant, "protocol": args.unseen_protocol, **_row(unseen_in, mean)})
        for site in scanner_in:
            scanner.append(
                {"strategy": variant, "protocol": protocols[site], "series": args.eval_ct_dir, **_row(scanner_in[site], scores[site]["unseen_scanner"])}
            )
    return {
        "results": results,
        "unseen_protocol": unseen,
        "unseen_scanner": scanner,
        "uplink_bytes_per_round": {r["variant"]: r["uplink_bytes_per_round"] for r in runs if r["uplink_bytes_per_round"]},
    }


def acceptance(report: dict[str, Any], protocols: dict[str, Any]) -> dict[str, Any]:
    """The issue's measured claims, for every federated variant, each with the numbers it rests on."""
    psnr = {(r["strategy"], r["site"]): r for r in report["results"]}
    strategies = {r["strategy"] for r in report["results"]}
    federated = [v for v in ("fedavg", "film", "fedbn") if v in strategies]
    sites = list(protocols)
    out: dict[str, Any] = {}
    if not federated:
        return out
    gains = {v: {s: psnr[(v, s)]["psnr_out"] - psnr[(v, s)]["psnr_in"] for s in sites} for v in federated}
    out["federated_improves_every_site"] = {"psnr_gain_db": gains, "met": all(g > 0 for v in gains.values() for g in v.values())}
    unseen = {r["strategy"]: r["psnr_out"] for r in report["unseen_protocol"]}
    if "local" in unseen:
        out["federated_beats_local_on_unseen_protocol"] = {
            "psnr": {v: unseen[v] for v in ["local", *federated]},
            "met": all(unseen[v] > unseen["local"] for v in federated),
        }
    if "centralized" in strategies:
        mean = {v: statistics.fmean(psnr[(v, s)]["psnr_out"] for s in sites) for v in [*federated, "centralized"]}
        gaps = {v: mean["centralized"] - mean[v] for v in federated}
        best = min(gaps, key=lambda v: gaps[v])
        out["federated_within_1db_of_centralized"] = {"mean_psnr_over_sites": mean, "gap_db": gaps, "best": best, "met": gaps[best] <= 1.0}
    if "fedavg" in strategies:
        # The most different protocol, by what it does to the images: the site whose low-dose input
        # PSNR is furthest (summed absolute difference) from the other sites'.
        noise = {s: psnr[("fedavg", s)]["psnr_in"] for s in sites}
        odd = max(sites, key=lambda s: sum(abs(noise[s] - noise[t]) for t in sites))
        for variant in ("film", "fedbn"):
            if variant in strategies:
                out[f"{variant}_beats_fedavg_on_most_different_site"] = {
                    "site": odd,
                    "protocol": str(protocols[odd]),
                    variant: psnr[(variant, odd)]["psnr_out"],
                    "fedavg": psnr[("fedavg", odd)]["psnr_out"],
                    "met": psnr[(variant, odd)]["psnr_out"] > psnr[("fedavg", odd)]["psnr_out"],
                }
    return out


def _mosaics(patches: np.ndarray, size: int, count: int = 32) -> np.ndarray:
    """Training patches (n, 1, p, p) tiled into whole-slice-sized inputs: the exported graph has the
    slice size fixed, and calibration must not see test slices."""
    n, c, p, _ = patches.shape
    k = size // p
    if k * p != size:
        raise ValueError(f"--image-size {size} must be a multiple of --patch {p} to calibrate the int8 export on training patches")
    chosen = patches[np.random.default_rng(0).permutation(n)[: count * k * k]]
    count = len(chosen) // (k * k)
    tiles = chosen[: count * k * k].reshape(count, k, k, c, p, p)
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 4, 2, 5).reshape(count, c, size, size))


def export_parity(weights: dict[str, np.ndarray], ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The FedAvg denoiser through exporters.onnx_fp and exporters.onnx_int8 (QDQ, calibrated on the
    sites' low-dose patches), run by onnxruntime on every site's test slices: PSNR beside torch's."""
    import torch

    from exporters import Calibration
    from exporters.onnx_fp import check_onnx_file, export_onnx
    from exporters.onnx_int8 import check_qdq, quantize_qdq
    from exporters.ort import ort_runner
    from fedge import weights as W
    from fedge.models import build_model
    from fedge.tasks.ldct import HU_SCALE, LdctTask, denoise_metrics, model_inputs

    pooled = LdctTask.pool(list(ctx["sites"].values()))
    config = pooled.model_config("redcnn", **_model_options({**vars(args), "variant": "fedavg"}))
    model = build_model(config)
    W.load_float_state(model, weights)
    model.eval()
    x = model_inputs(pooled.test.low, pooled.test.cond, 0).numpy()
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    calib = _mosaics(model_inputs(pooled.train.low, pooled.train.cond, 0).numpy(), config.image_size)
    out: dict[str, Any] = {"torch": denoise_metrics(pooled.test.normal, ref[:, 0] * HU_SCALE), "test_slices": len(x)}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, config, Path(tmp) / "model.onnx")
        check_onnx_file(fp32)
        # The exporter's default (MinMax), percentile calibration, and percentile with the skip Adds and
        # the BatchNorms after them left float (measured: the offset sums are what int8 resolves worst).
        calibrations = {
            "onnx-int8": Calibration(),
            "onnx-int8-percentile": Calibration("percentile", 99.9),
            "onnx-int8-percentile-float-add-bn": Calibration("percentile", 99.9, float_ops=("Add", "BatchNormalization")),
        }
        paths = {"onnx": fp32}
        for name, calibration in calibrations.items():
            paths[name] = quantize_qdq(fp32, Path(tmp) / f"{name}.onnx", calib, calibration)
            check_qdq(paths[name])
        for name, path in paths.items():
            runner = ort_runner(path, threads=1)
            y = np.concatenate([runner.run(x[i : i + 4]) for i in range(0, len(x), 4)])
            out[name] = {
                **denoise_metrics(pooled.test.normal, y[:, 0] * HU_SCALE),
                "bytes": path.stat().st_size,
                "max_abs_diff_hu": float(np.abs(y - ref).max() * HU_SCALE),
            }
            out[name]["psnr_delta_vs_torch"] = out[name]["psnr"] - out["torch"]["psnr"]
            if name in calibrations:
                out[name]["calibration"] = str(calibrations[name])
    return out


def picture(runs: list[dict[str, Any]], ctx: dict[str, Any], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[tuple[str, str], np.ndarray] = {}
    for run in runs:
        for site, s in run["scores"].items():
            images.setdefault((run["variant"], site), s["image"])
    columns = ["low-dose input", *[v for v in variants if any(k[0] == v for k in images)], "normal-dose reference"]
    sites = list(ctx["sites"])
    fig, axes = plt.subplots(len(sites), len(columns), figsize=(2.1 * len(columns), 2.2 * len(sites)), dpi=110, squeeze=False)
    for r, site in enumerate(sites):
        task = ctx["sites"][site]
        for c, column in enumerate(columns):
            image = task.test.low[0] if c == 0 else task.test.normal[0] if c == len(columns) - 1 else images[(column, site)]
            ax = axes[r][c]
            ax.imshow(image, cmap="gray", vmin=-160, vmax=240)  # a soft-tissue window (centre 40, width 400 HU)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{site}\n{ctx['protocols'][site]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_tables(report: dict[str, Any]) -> None:
    console = Console(width=max(Console().width, 120))
    table = Table(title="PSNR dB / SSIM per site (test slices, HU over the body mask)")
    table.add_column("site (I0:views[:noise])")
    strategies = list(dict.fromkeys(r["strategy"] for r in report["results"]))
    table.add_column("low-dose input", justify="right")
    for s in strategies:
        table.add_column(s, justify="right")
    cells = {(r["strategy"], r["site"]): r for r in report["results"]}
    for site in dict.fromkeys(r["site"] for r in report["results"]):
        first = cells[(strategies[0], site)]
        table.add_row(
            f"{site} ({first['protocol']})",
            f"{first['psnr_in']:.2f} / {first['ssim_in']:.3f}",
            *[f"{cells[(s, site)]['psnr_out']:.2f} / {cells[(s, site)]['ssim_out']:.3f}" for s in strategies],
        )
    for title, key in (("unseen protocol", "unseen_protocol"), ("unseen scanner", "unseen_scanner")):
        rows = report[key]
        for protocol in dict.fromkeys(r["protocol"] for r in rows):
            mine = {r["strategy"]: r for r in rows if r["protocol"] == protocol}
            first = next(iter(mine.values()))
            table.add_row(
                f"{title} ({protocol})",
                f"{first['psnr_in']:.2f} / {first['ssim_in']:.3f}",
                *[f"{mine[s]['psnr_out']:.2f} / {mine[s]['ssim_out']:.3f}" if s in mine else "" for s in strategies],
            )
    console.print(table)
    for name, a in report["acceptance"].items():
        console.print(f"{name}: {'met' if a['met'] else 'NOT met'} { ({k: v for k, v in a.items() if k != 'met'}) }")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ct_dir = default_ct_dir()
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report (the PNG goes beside it)")
    parser.add_argument(
        "--ct-dir",
        default=str(ct_dir) if ct_dir else None,
        help="folder of CT DICOM series the sites share out (default: $FEDGE_DATA_DIR/ct/ge_head_human_28slice)",
    )
    parser.add_argument("--eval-ct-dir", default=None, help="a CT series from a scanner no site used, to evaluate on")
    parser.add_argument("--protocols", nargs="+", default=list(SITE_PROTOCOLS[:4]), help="one I0:VIEWS[:NOISE] per site")
    parser.add_argument("--unseen-protocol", default=UNSEEN_PROTOCOL, help="a protocol no site trains on")
    parser.add_argument("--strategies", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (local-only and centralized train rounds x epochs)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--codec", default="q8|zstd", help="uplink codec of the federated runs")
    parser.add_argument("--image-size", type=int, default=128, help="slices are resampled to this size (512: full resolution, slow)")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--stride", type=int, default=12)
    parser.add_argument("--width", type=int, default=16, help="RED-CNN channels")
    parser.add_argument("--depth", type=int, default=4, help="RED-CNN encoder layers")
    parser.add_argument("--norm", default="batch", choices=("batch", "group"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="simulated pairs (default ~/.cache/fedge/ldct or $FEDGE_CACHE_DIR/ldct)")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX / int8 export parity")
    args = parser.parse_args()
    if not args.ct_dir:
        parser.error("--ct-dir is required when FEDGE_DATA_DIR does not point at the data folder (e.g. ../shared/data)")
    from fedge.data.ldct import default_cache_dir
    from server.strategies import STRATEGIES

    args.cache_dir = args.cache_dir or str(default_cache_dir())
    console = Console()
    pending = []
    if "fedbn" in args.strategies and "fedbn" not in STRATEGIES.names():
        pending.append("fedbn: strategy not registered yet (issue 13)")
        args.strategies = [s for s in args.strategies if s != "fedbn"]
    started, cpu = time.monotonic(), time.process_time()
    shared = {k: getattr(args, k) for k in ("ct_dir", "eval_ct_dir", "protocols", "unseen_protocol", "image_size", "patch", "stride", "seed", "cache_dir")}
    ctx = _setup(shared)  # simulates into the cache once; the workers read it
    console.print(
        f"simulated {len(ctx['sites'])} sites in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{s} {len(t.train)} patches/{len(t.test)} test slices" for s, t in ctx["sites"].items())
    )
    base = {k: getattr(args, k) for k in ("rounds", "epochs", "lr", "batch_size", "codec", "width", "depth", "norm", "seed")}
    jobs = [{**base, "variant": v, "site": s} for v in args.strategies for s in (ctx["sites"] if v == "local" else [None])]
    jobs.sort(key=lambda j: j["variant"] == "local")  # the long federations first
    runs = []
    with mp.get_context("spawn").Pool(args.workers, _init_worker, (shared,)) as pool:
        for run in pool.imap_unordered(run_job, jobs):
            runs.append(run)
            console.print(
                f"[{len(runs)}/{len(jobs)}] {run['variant']} {run['site'] or ''}: {run['cpu_seconds']:.0f} cpu s ({time.monotonic() - started:.0f} s)"
            )
    report: dict[str, Any] = {
        "benchmark": "ldct",
        "ct_dir": args.ct_dir,
        "eval_ct_dir": args.eval_ct_dir,
        "settings": {
            **base,
            "protocols": args.protocols,
            "unseen_protocol": args.unseen_protocol,
            "image_size": args.image_size,
            "patch": args.patch,
            "stride": args.stride,
            "metric": "PSNR/SSIM in HU over the body mask, data range 2000 HU (scikit-image)",
        },
        **summarize(runs, ctx, args),
        "pending": pending,
    }
    report["acceptance"] = acceptance(report, ctx["protocols"])
    fedavg = next((r["weights"] for r in runs if r["variant"] == "fedavg"), None)
    if fedavg is not None and not args.no_export:
        report["export"] = export_parity(fedavg, ctx, args)
    report["runs"] = [{k: r[k] for k in ("variant", "site", "cpu_seconds", "wall_seconds")} for r in runs]
    report["wall_seconds"] = time.monotonic() - started
    report["cpu_seconds"] = time.process_time() - cpu + sum(r["cpu_seconds"] for r in runs)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    picture(runs, ctx, args.strategies, args.report.with_suffix(".png"))
    print_tables(report)
    if "export" in report:
        e = report["export"]
        console.print(
            f"export PSNR: torch {e['torch']['psnr']:.2f}, " + ", ".join(f"{k} {v['psnr']:.2f}" for k, v in e.items() if k.startswith("onnx")) + " dB"
        )
    console.print(f"{report['wall_seconds']:.0f} s wall, {report['cpu_seconds']:.0f} cpu s; report {args.report}")


if __name__ == "__main__":
    main()
