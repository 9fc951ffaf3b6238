"""Training modes head to head: the same federation in full, lora, pruned and qat mode.

    .venv/bin/python benchmarks/modes.py --report runs/bench/modes.json

1. Pretrain a >= 5M-parameter ViT once on --pretrain-dataset (cached under --cache).
2. Per mode, in a fresh process (so memory peaks are not polluted by the other modes): trainable
   parameters, peak memory and seconds of a local training step, and the bytes of one site's
   update after a local epoch through --codec.
3. Per mode and seed: the federation (4 non-IID sites on --dataset, the same rounds and codec)
   started from the pretrained checkpoint; final test AUC, mean and std over seeds.

Writes {"results": [{"mode", "trainable_params", "uplink_bytes_per_round", "ratio_vs_full_fp32",
"final_auc", "final_auc_std", "peak_train_mem_mb", "step_seconds"}, ...]} plus the settings and the
pruning size change. `uplink_bytes_per_round` is the bytes all sites send in one round (measured
by the federation); `ratio_vs_full_fp32` divides the dense fp32 update of the full model from every
site by it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("full", "lora", "pruned", "qat")
# LoRA adapters start at zero and need a larger step than dense fine-tuning (standard practice).
DEFAULT_LR = {"full": 3e-4, "lora": 1e-3, "pruned": 3e-4, "qat": 3e-4}


def pretrained_checkpoint(args: argparse.Namespace) -> Path:
    """The cached foundation model; trained by `fedge pretrain` the first time."""
    out = Path(args.cache) / f"vit-{args.preset}-{args.pretrain_dataset}-e{args.pretrain_epochs}.safetensors"
    if out.is_file():
        return out
    cmd = [sys.executable, "-m", "fedge.cli.main", "pretrain", "--dataset", args.pretrain_dataset, "--arch", "vit",
           "--preset", args.preset, "--epochs", str(args.pretrain_epochs), "--out", str(out)]  # fmt: skip
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


def site_model(mode_name: str, checkpoint: Path, task: Any, seed: int) -> tuple[Any, Any, Any]:
    """What a site trains in `mode_name`: the pretrained backbone, pruned/wrapped as the mode says."""
    import torch

    from fedge.modes import get_mode, init_from_checkpoint

    splits = task.splits
    torch.manual_seed(seed)
    model, config = init_from_checkpoint(
        str(checkpoint), in_channels=splits.channels, num_classes=splits.num_classes, image_size=splits.image_size
    )
    mode = get_mode(mode_name)
    stats = None
    if mode_name == "pruned":
        result = mode.prune(model, config)  # type: ignore[attr-defined]
        model, config, stats = result.model, result.config, result.stats
    return mode, mode.prepare(model, config), stats


def footprint(mode_name: str, args: argparse.Namespace, checkpoint: Path, queue: Any) -> None:
    """Agent-side cost of one mode; runs in its own process and puts a dict on `queue`."""
    import numpy as np
    import torch

    from compression.codecs.pipeline import UpdateCodec
    from fedge import weights as W
    from fedge.data import dirichlet_split, load_medmnist
    from fedge.modes import measure_step
    from fedge.tasks import ClassificationTask, preprocess

    task = ClassificationTask(load_medmnist(args.dataset, args.data_dir))
    mode, model, stats = site_model(mode_name, checkpoint, task, args.seed)
    shard = dirichlet_split(task.splits.labels["train"], args.clients, args.alpha, args.seed)[0]
    x = preprocess(task.splits.images["train"][shard[: args.batch_size]])
    y = torch.from_numpy(task.splits.labels["train"][shard[: args.batch_size]])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=DEFAULT_LR[mode_name])
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    cost = measure_step(step, repeats=3)
    before = {k: v.clone().numpy() for k, v in mode.trainable_state(model).items()}
    task.train_local(model, shard, epochs=args.epochs, lr=DEFAULT_LR[mode_name], batch_size=args.batch_size, seed=args.seed)
    delta = {k: (v.numpy() - before[k]).astype(np.float32) for k, v in mode.trainable_state(model).items()}
    payload = UpdateCodec.from_spec(args.codec).encode(delta, keep_dense=W.norm_stat_names(delta), seed=args.seed)
    queue.put(
        {
            "mode": mode_name,
            "trainable_params": mode.trainable_params(model),
            "update_bytes": len(payload),
            "peak_train_mem_mb": round(cost.peak_mem_mb, 1),
            "step_seconds": round(cost.step_seconds, 4),
            "prune": dataclasses.asdict(stats) if stats is not None else None,
        }
    )


def measure_footprint(mode_name: str, args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=footprint, args=(mode_name, args, checkpoint, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"measuring mode {mode_name!r} failed (exit code {proc.exitcode}); see the traceback above")
    return queue.get(timeout=10)


def federate(mode_name: str, seed: int, args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    from fedge.cli.federation import FederationSettings, run_federation

    fields = {f.name for f in dataclasses.fields(FederationSettings)}
    needed = {"mode", "init"}
    if not needed <= fields:
        raise SystemExit(
            f"run_federation cannot run training modes yet: FederationSettings lacks {sorted(needed - fields)}. "
            "Wire fedge.modes into the server and agent (issue 4), then rerun."
        )
    settings = FederationSettings(
        dataset=args.dataset, data_dir=args.data_dir, clients=args.clients, rounds=args.rounds, codec=args.codec,
        arch="vit", seed=seed, alpha=args.alpha, epochs=args.epochs, lr=DEFAULT_LR[mode_name],
        batch_size=args.batch_size, workdir=Path(args.workdir) / f"{mode_name}-s{seed}",
        mode=mode_name, init=checkpoint,
    )  # type: ignore[call-arg]  # fmt: skip
    return run_federation(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--data-dir", default=None, help="Folder with the MedMNIST npz files (else FEDGE_DATA_DIR)")
    parser.add_argument("--dataset", default="breastmnist", help="Federated dataset")
    parser.add_argument("--pretrain-dataset", default="pneumoniamnist")
    parser.add_argument("--preset", default="small", help="ViT preset of the backbone (small: ~6.0M parameters)")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--cache", default="runs/bench/cache", help="Where the pretrained checkpoint is kept")
    parser.add_argument("--workdir", default="runs/bench/modes")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="First seed; footprints use it")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1, help="Local epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label skew of the site split")
    parser.add_argument("--codec", default="topk:0.1,ef|q8|zstd:3", help="The uplink codec every mode uses")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {','.join(MODES)}")

    started = time.monotonic()
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    checkpoint = pretrained_checkpoint(args)
    costs = {m: measure_footprint(m, args, checkpoint) for m in modes}
    for m, c in costs.items():
        print(f"{m:>7}: {c['trainable_params']:>10,d} trainable, {c['update_bytes']:>10,d} B/update, "
              f"{c['peak_train_mem_mb']:>8.1f} MB peak, {c['step_seconds']:.3f} s/step")  # fmt: skip

    from fedge.checkpoint import load_checkpoint

    full_params = sum(v.numel() for v in load_checkpoint(checkpoint).state.values() if v.is_floating_point())
    results = []
    for m in modes:
        runs = [federate(m, args.seed + i, args, checkpoint) for i in range(args.seeds)]
        aucs = [r["final"]["auc"] for r in runs]
        per_round = statistics.mean(rd["uplink_bytes"] for r in runs for rd in r["rounds"])
        results.append(
            {
                "mode": m,
                "trainable_params": costs[m]["trainable_params"],
                "uplink_bytes_per_round": per_round,
                "ratio_vs_full_fp32": 4 * full_params * args.clients / per_round,
                "final_auc": statistics.mean(aucs),
                "final_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "peak_train_mem_mb": costs[m]["peak_train_mem_mb"],
                "step_seconds": costs[m]["step_seconds"],
                "seed_aucs": aucs,
            }
        )
        print(f"{m:>7}: AUC {results[-1]['final_auc']:.4f} ± {results[-1]['final_auc_std']:.4f}, ratio {results[-1]['ratio_vs_full_fp32']:.0f}x")
    report = {
        "results": results,
        "footprints": costs,
        "settings": {**{k: v for k, v in vars(args).items() if k != "report"}, "lr": DEFAULT_LR, "checkpoint": str(checkpoint)},
        "full_params": full_params,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
