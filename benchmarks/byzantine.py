"""Robust aggregation under attack: every registered strategy against every attack, plus the clean run.

10 PneumoniaMNIST sites (Dirichlet 0.5), 2 of them malicious, 15 rounds, 3 seeds, with the default
compressed codec (`topk:0.02,ef|ternary|zstd`). Each run is an in-process federation
(`server.simulation`): the task's own local training, the real codec, the server's validation
(sample cap, finite, norm bound), the real strategy classes and the server's non-finite guard; only
MQTT is left out, which is what lets 147 federations fit in the default's half hour. The CNN is the
zoo's `cnn` at widths 8,16,32 (`--widths`) for the same reason.

Report: {"results": [{"attack", "strategy", "final_auc", "final_auc_std", "seconds_per_round", ...}],
"clean_auc": the clean FedAvg mean}; clean runs appear in "results" with attack "none".
seconds_per_round is a whole round (10 sites training plus aggregation); aggregate_seconds_per_round
is the strategy alone. More seeds: `--seeds 0 1 2 3 4`.

    python benchmarks/byzantine.py --report benchmarks/results/byzantine.json
    python benchmarks/byzantine.py --report /tmp/b.json --seeds 0 --rounds 2 --attacks sign_flip --strategies fedavg median
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedge.data.medmnist import default_data_dir
from server.simulation import ATTACKS
from server.strategies import STRATEGIES

CLEAN = "none"
ROBUST_MARGIN = 0.03  # acceptance: the best robust rule under sign_flip within this of clean FedAvg
FEDAVG_DROP = 0.1  # ... while FedAvg falls by more than this
_TASK: Any = None


def _init_worker(dataset: str, data_dir: str | None, threads: int) -> None:
    global _TASK
    import torch

    from fedge.data import load_medmnist
    from fedge.tasks import ClassificationTask

    torch.set_num_threads(threads)
    _TASK = ClassificationTask(load_medmnist(dataset, data_dir))


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    from server.simulation import (
        Adversary,
        InProcessFederation,
        SimulationSettings,
        get_attack,
    )
    from server.strategies import get_strategy

    settings = SimulationSettings(
        sites=job["sites"], rounds=job["rounds"], alpha=job["alpha"], codec=job["codec"], model_options={"widths": tuple(job["widths"])}, seed=job["seed"]
    )
    adversary = None if job["attack"] == CLEAN else Adversary(get_attack(job["attack"]), job["malicious"])
    cpu = time.process_time()
    result = InProcessFederation(settings, _TASK, get_strategy(job["strategy"]), adversary).run()
    result["cpu_seconds"] = time.process_time() - cpu  # what an idle machine would spend (wall time includes other jobs)
    history = result.pop("history")
    return {
        **{k: job[k] for k in ("attack", "strategy", "seed")},
        **result,
        "rejected": sum(len(r["rejected"]) for r in history),
        "left_out": sum(len(r["left_out"]) for r in history),
        "rounds_not_applied": sum(not r["applied"] for r in history),
    }


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for attack in [CLEAN, *args.attacks]:
        for strategy in args.strategies:
            rs = sorted((r for r in runs if r["attack"] == attack and r["strategy"] == strategy), key=lambda r: r["seed"])
            if not rs:
                continue
            aucs = [r["final_auc"] for r in rs]
            rows.append(
                {
                    "attack": attack,
                    "strategy": strategy,
                    "final_auc": statistics.fmean(aucs),
                    "final_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                    "seconds_per_round": statistics.fmean(r["seconds_per_round"] for r in rs),
                    "aggregate_seconds_per_round": statistics.fmean(r["aggregate_seconds_per_round"] for r in rs),
                    "final_auc_per_seed": aucs,
                    "seeds": [r["seed"] for r in rs],
                    "rejected_updates": sum(r["rejected"] for r in rs),
                    "left_out_by_guard": sum(r["left_out"] for r in rs),
                    "all_finite": all(r["finite"] for r in rs),
                    "runs_outputting_nan": sum(r["outputs_nan"] for r in rs),
                }
            )
    auc = {(r["attack"], r["strategy"]): r["final_auc"] for r in rows}
    clean = auc.get((CLEAN, "fedavg"))
    acceptance: dict[str, Any] = {}
    robust = {s: a for (att, s), a in auc.items() if att == "sign_flip" and s != "fedavg"}
    if clean is not None and robust and ("sign_flip", "fedavg") in auc:
        best = max(robust, key=lambda s: robust[s])
        acceptance = {
            "best_robust_under_sign_flip": best,
            "its_auc": robust[best],
            "clean_fedavg_auc": clean,
            "fedavg_under_sign_flip": auc[("sign_flip", "fedavg")],
            "met": bool(clean - robust[best] <= ROBUST_MARGIN and clean - auc[("sign_flip", "fedavg")] > FEDAVG_DROP),
        }
    return {
        "benchmark": "byzantine",
        "task": f"classification/{args.dataset}",
        "sites": args.sites,
        "malicious": args.malicious,
        "rounds": args.rounds,
        "alpha": args.alpha,
        "codec": args.codec,
        "arch": f"cnn widths {args.widths}",
        "seeds": args.seeds,
        "attacks": {name: ATTACKS[name].describe for name in args.attacks},
        "strategy_options": "registry defaults",
        "clean_auc": clean,
        "acceptance": acceptance,
        "results": rows,
        "runs": runs,
    }


def print_table(report: dict[str, Any]) -> None:
    console = Console(width=max(Console().width, 140))
    attacks = [CLEAN, *report["attacks"]]
    table = Table(
        title=f"Final test AUC (mean ± std over seeds {report['seeds']}): {report['sites']} sites, "
        f"{report['malicious']} malicious, {report['rounds']} rounds, {report['codec']}"
    )
    table.add_column("strategy")
    for attack in attacks:
        table.add_column(attack, justify="right")
    table.add_column("s/round", justify="right")
    cells = {(r["attack"], r["strategy"]): r for r in report["results"]}
    for strategy in dict.fromkeys(r["strategy"] for r in report["results"]):
        row = [strategy]
        for attack in attacks:
            r = cells.get((attack, strategy))
            row.append(f"{r['final_auc']:.3f} ± {r['final_auc_std']:.3f}" if r else "")
        mine = [r["seconds_per_round"] for (a, s), r in cells.items() if s == strategy]
        row.append(f"{statistics.fmean(mine):.2f}")
        table.add_row(*row)
    console.print(table)
    if report["acceptance"]:
        a = report["acceptance"]
        console.print(
            f"sign_flip: best robust {a['best_robust_under_sign_flip']} {a['its_auc']:.3f} vs clean FedAvg "
            f"{a['clean_fedavg_auc']:.3f}; FedAvg {a['fedavg_under_sign_flip']:.3f}; acceptance {'met' if a['met'] else 'not met'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    robust = [name for name in STRATEGIES if name != "dp_fedavg"]  # a privacy rule, measured by benchmarks/privacy.py
    parser.add_argument("--strategies", nargs="+", default=robust, choices=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--malicious", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--codec", default="topk:0.02,ef|ternary|zstd")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32], help="CNN channel widths")
    parser.add_argument("--workers", type=int, default=2, help="federations run in parallel (one torch thread each)")
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--resume", action="store_true", help="keep finished runs from an existing --report")
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    if args.resume and args.report.exists():
        runs = [r for r in json.loads(args.report.read_text()).get("runs", []) if r["seed"] in args.seeds]
    done = {(r["attack"], r["strategy"], r["seed"]) for r in runs}
    base = {"sites": args.sites, "rounds": args.rounds, "alpha": args.alpha, "codec": args.codec, "widths": args.widths, "malicious": args.malicious}
    jobs = [
        {**base, "attack": a, "strategy": s, "seed": seed}
        for seed in args.seeds
        for a in [CLEAN, *args.attacks]
        for s in args.strategies
        if (a, s, seed) not in done
    ]
    console = Console()
    console.print(f"{len(jobs)} federations ({len(done)} kept), {args.workers} workers")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with mp.get_context("spawn").Pool(args.workers, _init_worker, (args.dataset, args.data_dir, 1)) as pool:
        for run in pool.imap_unordered(run_one, jobs):
            runs.append(run)
            console.print(
                f"[{len(runs)}/{len(jobs) + len(done)}] {run['attack']:>16} {run['strategy']:>17} seed {run['seed']}: "
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
