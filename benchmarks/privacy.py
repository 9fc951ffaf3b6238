"""AUC against epsilon: record-level DP-SGD at the sites, client-level DP at the server (central) and
at the sites (local), beside no DP, on the 10-site benchmark and a larger simulated federation.

Every run is an in-process federation (`server.simulation`: the task's own training, the real
codec (--codec, default `q8,ef|zstd`), the server's validation and strategy classes), PneumoniaMNIST,
15 rounds, 3 seeds, the zoo's `cnn` at widths 8,16,32 with GroupNorm (`norm=group`: DP-SGD cannot
train BatchNorm, and the no-DP baseline uses the same model). Noise is calibrated so that the whole
federation spends the target epsilon at delta 1e-5 (opacus's RDP accountant):

  record          DP-SGD at every site (per-sample clip 1.0, Poisson batches of expected size
                  --dp-batch-size, SGD with momentum at --dp-lr: Adam spreads the noise over every
                  coordinate and top-k then sends noise); each site's noise from its own sample rate
                  and steps over all rounds; epsilon is per site (each patient), reported as the
                  largest any site spent. The other arms train with Adam at lr 1e-3, batch 32.
  client-central  dp_fedavg at the server: updates clipped to --clip, noise std sigma * clip / n on
                  the mean; every site takes part each round (sample rate 1); epsilon per site
                  (each hospital's whole contribution).
  client-local    each site clips its delta to --clip and adds N(0, (sigma * clip)^2) before the codec.

Order everywhere: clip, noise, then compress (the codec post-processes a released value).
The default codec is dense int8: top-k of a DP-SGD delta picks the coordinates where the noise is
largest, so the record-level arm and its no-DP baseline also run through --contrast-codec (the
byzantine benchmark's `topk:0.02,ef|ternary|zstd`) at epsilon 8, to show what that costs.
The larger federation has --large-sites sites split with Dirichlet --large-alpha (at 0.5, some of
100 sites would hold fewer than 10 images) and --large-epochs local epochs (its sites hold ~47
images: one epoch is one or two steps).

Report: {"results": [{"dp", "sites", "epsilon", "delta", "final_auc", "final_auc_std", ...}]}, with
epsilon null for no DP.

    python benchmarks/privacy.py --report benchmarks/results/privacy.json
    python benchmarks/privacy.py --report /tmp/p.json --seeds 0 --rounds 2 --epsilons 8 --large-sites 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedge.data.medmnist import default_data_dir

DELTA = 1e-5
ACCEPT_RECORD_EPSILON, ACCEPT_AUC = 8.0, 0.05  # record-level DP at epsilon ~8 within 0.05 AUC of no DP
_TASK: Any = None


def _init_worker(dataset: str, data_dir: str | None) -> None:
    global _TASK
    import torch

    from fedge.data import load_medmnist
    from fedge.tasks import ClassificationTask

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # simulation: reproducible noise on purpose
    _TASK = ClassificationTask(load_medmnist(dataset, data_dir))


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One federation of arm `job["dp"]` at `job["epsilon"]` (None: no DP)."""
    import math

    import numpy as np

    from fedge.tasks.dp import (
        DPSettings,
        PrivacyLedger,
        gaussian_release,
        noise_multiplier_for,
    )
    from server.simulation import InProcessFederation, SimulationSettings
    from server.strategies import get_strategy

    settings = SimulationSettings(
        sites=job["sites"],
        rounds=job["rounds"],
        alpha=job["alpha"],
        epochs=job["epochs"],
        codec=job["codec"],
        model_options={"widths": tuple(job["widths"]), "norm": "group"},
        seed=job["seed"],
    )
    dp, eps, seed = job["dp"], job["epsilon"], job["seed"]
    strategy, trainer, local_noise, sigma = get_strategy("fedavg"), None, None, None
    ledgers: dict[str, PrivacyLedger] = {}
    if dp in ("client-central", "client-local"):
        sigma = noise_multiplier_for(eps, DELTA, 1.0, settings.rounds)
    if dp == "client-central":
        strategy = get_strategy("dp_fedavg", noise_multiplier=sigma, max_norm=job["clip"], delta=DELTA, seed=seed)
    elif dp == "client-local":

        def local_noise(delta, rng):
            return gaussian_release(delta, job["clip"], sigma, rng)
    elif dp == "record":

        def trainer(task, model, site, indices, site_seed):
            q = min(1.0, job["dp_batch_size"] / len(indices))
            steps = settings.rounds * settings.epochs * math.ceil(1 / q)
            noise = noise_multiplier_for(eps, DELTA, q, steps)
            result = task.train_local(
                model,
                indices,
                epochs=settings.epochs,
                lr=job["dp_lr"],
                batch_size=job["dp_batch_size"],
                seed=site_seed,
                dp=DPSettings(noise, max_grad_norm=job["grad_clip"], delta=DELTA),
            )
            ledgers.setdefault(site, PrivacyLedger()).record(noise, result.dp_sample_rate, result.dp_steps)
            return result.num_samples

    fed = InProcessFederation(settings, _TASK, strategy, trainer=trainer, local_noise=local_noise)
    cpu = time.process_time()
    result = fed.run()
    cpu = time.process_time() - cpu  # what an idle machine would spend (wall time includes other jobs)
    spent = max((ledger.epsilon(DELTA) for ledger in ledgers.values()), default=None)
    if dp in ("client-central", "client-local"):
        spent = PrivacyLedger([(sigma, 1.0, settings.rounds)]).epsilon(DELTA)
    return {
        "dp": dp,
        "sites": job["sites"],
        "epsilon": eps,
        "codec": job["codec"],
        "seed": seed,
        "final_auc": result["final_auc"],
        "epsilon_spent": spent,
        "noise_multiplier": sigma,
        "seconds_per_round": result["seconds_per_round"],
        "outputs_nan": result["outputs_nan"],
        "cpu_seconds": cpu,
        "mean_update_bytes": float(np.mean([r["uplink_bytes"] / max(r["updates"], 1) for r in result["history"]])),
    }


def jobs_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {
        "rounds": args.rounds,
        "codec": args.codec,
        "widths": args.widths,
        "clip": args.clip,
        "grad_clip": 1.0,
        "dp_lr": args.dp_lr,
        "dp_batch_size": args.dp_batch_size,
    }
    ten = {**base, "sites": args.sites, "alpha": args.alpha, "epochs": args.epochs}
    large = {**base, "sites": args.large_sites, "alpha": args.large_alpha, "epochs": args.large_epochs}
    arms = [("none", ten, [None]), ("record", ten, args.epsilons), ("client-central", ten, args.epsilons), ("client-local", ten, args.local_epsilons)]
    if args.large_sites:
        arms += [("none", large, [None]), ("client-central", large, args.epsilons), ("client-local", large, args.local_epsilons)]
    if args.contrast_codec:  # the same record-level arm through a sparsifying codec, beside its own no-DP baseline
        contrast = {**ten, "codec": args.contrast_codec}
        arms += [("none", contrast, [None]), ("record", contrast, [ACCEPT_RECORD_EPSILON])]
    return [{**fed, "dp": dp, "epsilon": eps, "seed": seed} for seed in args.seeds for dp, fed, epsilons in arms for eps in epsilons]


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rows = []

    def key(r: dict[str, Any]) -> tuple:
        return r["dp"], r["sites"], r["epsilon"], r.get("codec", args.codec)

    for dp, sites, eps, codec in dict.fromkeys(key(r) for r in runs):
        rs = sorted((r for r in runs if key(r) == (dp, sites, eps, codec)), key=lambda r: r["seed"])
        aucs = [r["final_auc"] for r in rs]
        rows.append(
            {
                "dp": dp,
                "sites": sites,
                "epsilon": eps,
                "codec": codec,
                "delta": DELTA if eps is not None else None,
                "final_auc": statistics.fmean(aucs),
                "final_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "epsilon_spent": max((r["epsilon_spent"] for r in rs if r["epsilon_spent"] is not None), default=None),
                "noise_multiplier": rs[0]["noise_multiplier"],
                "seeds": [r["seed"] for r in rs],
                "final_auc_per_seed": aucs,
                "seconds_per_round": statistics.fmean(r["seconds_per_round"] for r in rs),
            }
        )
    rows.sort(key=lambda r: (r["codec"] != args.codec, r["sites"], r["dp"] != "none", r["dp"], r["epsilon"] or 0))
    none = {(r["sites"], r["codec"]): r["final_auc"] for r in rows if r["dp"] == "none"}
    for r in rows:
        r["auc_delta_vs_no_dp"] = r["final_auc"] - none[r["sites"], r["codec"]] if (r["sites"], r["codec"]) in none else None
    ours = [r for r in rows if r["codec"] == args.codec]
    record = [r for r in ours if r["dp"] == "record" and r["epsilon"] == ACCEPT_RECORD_EPSILON]
    usable = sorted(
        {
            r["sites"]
            for r in ours
            if r["dp"] == "client-central"
            and r["epsilon"] == ACCEPT_RECORD_EPSILON
            and r["auc_delta_vs_no_dp"] is not None
            and r["auc_delta_vs_no_dp"] >= -ACCEPT_AUC
        }
    )
    return {
        "benchmark": "privacy",
        "task": f"classification/{args.dataset}",
        "rounds": args.rounds,
        "codec": args.codec,
        "arch": f"cnn widths {args.widths} norm=group",
        "seeds": args.seeds,
        "delta": DELTA,
        "clip": args.clip,
        "record_training": {"optimizer": "SGD momentum 0.9", "lr": args.dp_lr, "batch_size": args.dp_batch_size, "grad_clip": 1.0},
        "other_training": {"optimizer": "Adam", "lr": 1e-3, "batch_size": 32},
        "federations": {
            str(args.sites): {"alpha": args.alpha, "epochs": args.epochs},
            str(args.large_sites): {"alpha": args.large_alpha, "epochs": args.large_epochs},
        },
        "acceptance": {
            "record_epsilon_8_auc_delta": record[0]["auc_delta_vs_no_dp"] if record else None,
            "record_met": bool(record and record[0]["auc_delta_vs_no_dp"] >= -ACCEPT_AUC),
            "client_central_within_0.05_at_epsilon_8": usable or "none of the federation sizes tried",
        },
        "results": rows,
        "runs": runs,
    }


def print_table(report: dict[str, Any]) -> None:
    table = Table(title=f"Final test AUC vs epsilon (delta {report['delta']}), {report['rounds']} rounds, {report['codec']}, seeds {report['seeds']}")
    for col in ("dp", "sites", "codec", "epsilon", "sigma", "final AUC", "std", "Δ vs no DP"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            r["dp"],
            str(r["sites"]),
            r["codec"],
            "-" if r["epsilon"] is None else f"{r['epsilon']:g}",
            "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}",
            f"{r['final_auc']:.3f}",
            f"{r['final_auc_std']:.3f}",
            "" if r["auc_delta_vs_no_dp"] is None else f"{r['auc_delta_vs_no_dp']:+.3f}",
        )
    Console(width=max(Console().width, 120)).print(table)
    Console().print(f"acceptance: {report['acceptance']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="target epsilons")
    parser.add_argument("--local-epsilons", type=float, nargs="*", default=[8.0], help="targets for client-local DP (none: skip)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--large-sites", type=int, default=100, help="the simulated larger federation (0: skip)")
    parser.add_argument("--large-alpha", type=float, default=2.0)
    parser.add_argument("--large-epochs", type=int, default=3)
    parser.add_argument("--clip", type=float, default=1.0, help="client-level L2 bound on a decoded update (about its median norm without DP)")
    parser.add_argument("--dp-lr", type=float, default=0.5, help="DP-SGD's learning rate (SGD, momentum 0.9)")
    parser.add_argument("--dp-batch-size", type=int, default=64, help="DP-SGD's expected (Poisson) batch size")
    parser.add_argument("--codec", default="q8,ef|zstd", help="the uplink codec of every arm (dense: top-k of a DP-SGD delta sends noise)")
    parser.add_argument(
        "--contrast-codec", default="topk:0.02,ef|ternary|zstd", help="also run no DP and record-level DP at epsilon 8 through this codec ('' to skip)"
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-dir", default=default_data_dir())
    args = parser.parse_args()

    jobs = jobs_for(args)
    console = Console()
    console.print(f"{len(jobs)} federations, {args.workers} workers")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with mp.get_context("spawn").Pool(args.workers, _init_worker, (args.dataset, args.data_dir)) as pool:
        for run in pool.imap_unordered(run_one, jobs):
            runs.append(run)
            console.print(
                f"[{len(runs)}/{len(jobs)}] {run['dp']:>14} {run['sites']:>4} sites eps {run['epsilon']} seed {run['seed']}: "
                f"AUC {run['final_auc']:.4f} ({time.monotonic() - started:.0f} s)"
            )
            args.report.write_text(json.dumps({"partial": True, "runs": runs}, indent=2) + "\n")
    report = summarize(runs, args)
    report["wall_seconds"] = time.monotonic() - started
    report["cpu_seconds"] = sum(r.get("cpu_seconds", 0.0) for r in runs)  # / workers: the wall time on an idle machine
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


if __name__ == "__main__":
    main()
