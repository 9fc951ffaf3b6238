"""The live head-calibration round (`fedge server --calibrate-head`) against the simulation it was first measured in.

BreastMNIST, 4 sites, Dirichlet alpha 0.5, the recipe of `noniid.py` (cnn 32/64/128, SGD lr 0.2
with momentum, cosine schedule, augmentation, logit adjustment tau 1, `topk:0.02,ef|ternary|zstd`,
60 rounds). Per seed and strategy:
- live: `run_federation` (the server in this process, each site an agent process, the embedded amqtt
  broker on 127.0.0.1, signed records) with `calibrate_head`: round 60's test AUC (the trained
  head), round 61's (the LDA head the calibration round fit from the sites' statistics), and the
  bytes the statistics took on the uplink;
- in this process, the same settings and seed in the simulation (`server.simulation`, its
  `calibrated()`), the centralized bound of the same recipe (`fedge.tasks.bounds`, through
  `noniid.run_one`), and MedMNIST v2's published ResNet-18 (28) AUC.

    python benchmarks/live_calibration.py --report benchmarks/results/live-calibration.json
    python benchmarks/live_calibration.py --report /tmp/l.json --seeds 0 --strategies fedavg --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import noniid
from rich.console import Console

from fedge.data.medmnist import default_data_dir
from fedge.tasks.bounds import PUBLISHED_RESNET18_28_AUC

DATASET, ALPHA, SITES = "breastmnist", 0.5, 4
RECIPE = {"widths": [32, 64, 128], "augment": True, "lr_schedule": "cosine", "logit_adjust": noniid.LOGIT_ADJUST_TAU, "optimizer": "sgd", "lr": 0.2,
          "codec": "topk:0.02,ef|ternary|zstd", "epochs": 1}  # fmt: skip


def live(strategy: str, seed: int, rounds: int, data_dir: str) -> dict[str, Any]:
    """One federation over amqtt with its calibration round: the trained and the calibrated AUC."""
    from fedge.cli.federation import FederationSettings, run_federation

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        report = run_federation(
            FederationSettings(
                dataset=DATASET,
                data_dir=data_dir,
                clients=SITES,
                rounds=rounds,
                codec=RECIPE["codec"],
                model_options={"widths": RECIPE["widths"]},
                seed=seed,
                alpha=ALPHA,
                epochs=RECIPE["epochs"],
                lr=RECIPE["lr"],
                local_optimizer=RECIPE["optimizer"],
                lr_schedule=RECIPE["lr_schedule"],
                augment=RECIPE["augment"],
                logit_adjust=RECIPE["logit_adjust"],
                strategy=strategy,
                calibrate_head=True,
                workdir=Path(workdir) / "run",
            )  # fmt: skip
        )
    trained, calibrated = report["rounds"][-2], report["rounds"][-1]
    if not calibrated.get("head_calibration"):
        raise RuntimeError(f"{strategy} seed {seed}: the last round was not a completed calibration round: {calibrated}")
    return {"trained_auc": trained["auc"], "calibrated_auc": calibrated["auc"], "calibration_uplink_bytes_per_site": calibrated["uplink_bytes"] / SITES,
            "training_uplink_bytes_per_round": statistics.fmean(r["uplink_bytes"] for r in report["rounds"][:-1]),
            "rejected_updates": report["rejected_updates"], "seconds": time.monotonic() - started}  # fmt: skip


def job(kind: str, strategy: str | None, seed: int, rounds: int) -> dict[str, Any]:
    """A `noniid.run_one` job of this benchmark's settings."""
    return {"kind": kind, "dataset": DATASET, "seed": seed, "alpha": ALPHA if kind == "federation" else None, "strategy": strategy, "sites": SITES,
            "rounds": rounds, "calibrate": True, **RECIPE}  # fmt: skip


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "scaffold"], choices=["fedavg", "fedprox", "fedadam", "fedyogi", "scaffold"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=60, help="training rounds before the calibration round")
    parser.add_argument("--data-dir", default=default_data_dir())
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    console = Console()
    noniid._init_worker(args.data_dir, 1)
    started = time.monotonic()
    central = {seed: noniid.run_one(job("centralized", None, seed, args.rounds)) for seed in args.seeds}
    console.print(f"centralized: {[round(c['auc'], 4) for c in central.values()]} ({time.monotonic() - started:.0f} s)")
    results = []
    for strategy in args.strategies:
        runs, sims = [], []
        for seed in args.seeds:
            runs.append(live(strategy, seed, args.rounds, args.data_dir))
            sims.append(noniid.run_one(job("federation", strategy, seed, args.rounds)))
            console.print(f"{strategy} seed {seed}: live {runs[-1]['trained_auc']:.4f} -> {runs[-1]['calibrated_auc']:.4f}, "
                          f"simulation {sims[-1]['final_auc']:.4f} -> {sims[-1]['calibrated_auc']:.4f} ({time.monotonic() - started:.0f} s)")  # fmt: skip
        results.append({
            "strategy": strategy,
            "live_trained_auc": _stats([r["trained_auc"] for r in runs]),
            "live_calibrated_auc": _stats([r["calibrated_auc"] for r in runs]),
            "simulation_trained_auc": _stats([s["final_auc"] for s in sims]),
            "simulation_calibrated_auc": _stats([s["calibrated_auc"] for s in sims]),
            "calibration_uplink_bytes_per_site": statistics.fmean(r["calibration_uplink_bytes_per_site"] for r in runs),
            "simulation_calibration_bytes_per_site": sims[0]["calibration_bytes_per_site"],
            "training_uplink_bytes_per_round": statistics.fmean(r["training_uplink_bytes_per_round"] for r in runs),
            "rejected_updates": sum(r["rejected_updates"] for r in runs),
            "live_seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
        })  # fmt: skip
    centralized = _stats([c["auc"] for c in central.values()])
    best = max(results, key=lambda r: r["live_calibrated_auc"]["mean"])
    report = {
        "dataset": DATASET, "alpha": ALPHA, "sites": SITES, "rounds": args.rounds, "seeds": args.seeds, "recipe": RECIPE,
        "centralized_auc": centralized, "centralized_calibrated_auc": _stats([c["calibrated_auc"] for c in central.values()]),
        "published_resnet18_28_auc": PUBLISHED_RESNET18_28_AUC[DATASET],
        "results": results,
        "acceptance": {
            "best_live": best["strategy"],
            "best_live_calibrated_gap_to_centralized": centralized["mean"] - best["live_calibrated_auc"]["mean"],
            "best_live_calibrated_within_0.02_of_centralized": centralized["mean"] - best["live_calibrated_auc"]["mean"] <= noniid.ACCEPT_GAP,
            "largest_live_minus_simulation_calibrated": max(abs(a - b) for r in results
                                                            for a, b in zip(r["live_calibrated_auc"]["per_seed"], r["simulation_calibrated_auc"]["per_seed"])),
        },
        "wall_seconds": time.monotonic() - started,
    }  # fmt: skip
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    console.print(json.dumps(report["acceptance"], indent=2))


if __name__ == "__main__":
    main()
