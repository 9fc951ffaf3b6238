"""Training modes head to head: the same federation in full, lora, pruned and qat mode.

    .venv/bin/python benchmarks/modes.py --report runs/bench/modes.json

1. Pretrain a >= 5M-parameter backbone once on --pretrain-dataset with `fedge pretrain` (cached under
   --cache, named by arch, options, lr and augmentation). The default (BACKBONES["cnn"]) is the zoo's
   cnn at widths 64/128/256/2048 with GroupNorm, 5.1M parameters, pretrained 30 epochs on BreastMNIST
   with flips and shifts, and fine-tuned on PneumoniaMNIST: a backbone whose full fine-tuning reaches
   the MedMNIST v2 ResNet-18 (28) AUC there (0.944) when trained centrally. `--arch vit` is the earlier
   ViT-small (6.0M), which on BreastMNIST reached only 0.809 centrally (0.901 published).
2. Per mode, in a fresh process (so one mode's memory peak does not pollute another's): trainable
   parameters, peak memory (RSS) and seconds of one local training step as an agent runs it
   (fedge.modes.measure_step, --threads torch threads like the agent; every process imports peft
   first, so the same libraries are resident in every mode; memory with a fixed malloc mmap
   threshold so that RSS follows live tensors, see LIVE_MEMORY_ENV), and for `pruned` the
   parameters and MACs before and after pruning.
3. Per mode and seed: the federation (--clients non-IID sites on --dataset, the same rounds, seeds
   and uplink --codec for every mode) started from the pretrained checkpoint; final test AUC, mean
   and std over the seeds.

4. The bounds (fedge.tasks.bounds): full fine-tuning of the same backbone on the pooled data
   (centralized) and on each site's split alone (local-only, mean over sites), same seeds, split
   and passes over the data; top-level "bounds": {"centralized_auc", "local_only_auc"}.

Writes {"results": [{"mode", "trainable_params", "uplink_bytes_per_round", "ratio_vs_full_fp32",
"final_auc", "final_auc_std", "peak_train_mem_mb", "step_seconds", ...}], "acceptance": {...}, ...}.
`uplink_bytes_per_round` is what all sites send in one round (envelopes as the server receives
them), averaged over rounds and seeds; `ratio_vs_full_fp32` is the dense fp32 update of the full
model divided by the bytes of one site's update (uplink_bytes_per_round / clients). The report is
rewritten after every mode, so an interrupted run keeps what it finished.

The default codec is dense block int4 with stochastic rounding and error feedback (`q4,ef|zstd:3`):
every trainable coordinate moves every round, which is what a few-round fine-tune needs (a
per-tensor top-k at 1% lets a 578-weight head change 6 weights a round). On the cnn, LoRA adapts
every convolution at rank 4 (peft's Conv2d adapters; 0.59% of the parameters with the head), and
GroupNorm keeps no running statistics, so nothing but adapters and head travels: int4 makes the
update ~1500x smaller than the full model's in fp32 (BatchNorm's statistics would travel dense in
lora mode, fedge.modes.LoraMode). On the ViT, LoRA adapts the attention `qkv` projections (the q/v
practice of the LoRA paper and MeLo). Measured on the ViT at 8 rounds x 3 seeds: with 1-bit signs
(`ternary,ef|zstd:3`), LoRA ends 0.03-0.04 AUC below full whatever its learning rate, alpha, FFA
(`freeze_a`) or `train_norms`; in fp32 it is level with full: the 1-bit quantization noise costs,
not the adapters' capacity.

Defaults (3 rounds of 1 local epoch on PneumoniaMNIST's 4,708 images, cosine lr over the rounds,
3 seeds) are sized to finish in under 30 minutes on this 2-core machine with the checkpoint cached
(the first run also pretrains: 2.5 minutes); the bounds train with every core, the footprints with
--threads like an agent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import typer

from fedge.cli.options import parse_mode_options
from fedge.data.medmnist import default_data_dir
from fedge.protocol import MODE_NAMES
from fedge.schedule import LR_SCHEDULES

REPO = Path(__file__).resolve().parents[1]

MODES = MODE_NAMES
# LoRA adapters start at zero (B = 0) and need a larger step than dense fine-tuning (standard practice).
DEFAULT_LR = {"full": 5e-4, "lora": 3e-3, "pruned": 5e-4, "qat": 5e-4}
MIN_BACKBONE_PARAMS = 5_000_000
BACKBONES: dict[str, dict[str, Any]] = {
    "cnn": {"widths": [64, 128, 256, 2048], "norm": "group"},  # 5.1M; GroupNorm: no running statistics to send in lora mode
    "vit": {"preset": "small"},  # 6.0M
}
LORA_TARGETS = {"cnn": ["all"], "vit": ["qkv"]}
DEFAULT_LORA_R = 4


def parse_lora_options(text: str) -> dict[str, Any]:
    """--mode-options syntax; a bad pair is argparse's usage error, not a traceback."""
    try:
        return parse_mode_options(text)
    except typer.BadParameter as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parse_lr(text: str) -> dict[str, float]:
    """'1e-3' (every mode) or 'full=5e-4,lora=3e-3' (the rest keep their defaults)."""
    text = text.strip()
    if "=" not in text:
        return dict.fromkeys(MODES, float(text))
    lr = dict(DEFAULT_LR)
    for pair in text.split(","):
        mode, _, value = pair.partition("=")
        if mode.strip() not in MODES:
            raise argparse.ArgumentTypeError(f"--lr names unknown mode {mode.strip()!r}; choose from {','.join(MODES)}")
        lr[mode.strip()] = float(value)
    return lr


def mode_options(mode_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """What `get_mode(mode_name, **options)` gets, in the footprint and in the federation alike."""
    if mode_name == "lora":
        chosen = args.lora_targets or LORA_TARGETS[args.arch]
        targets = {} if chosen == ["all"] else {"targets": chosen}
        return {"r": args.lora_r, "alpha": args.lora_alpha, **targets, **args.lora_options}
    if mode_name == "pruned":
        return {"ratio": args.prune_ratio}
    return {}


def backbone_options(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture options of the backbone: the arch's defaults (BACKBONES), then --arch-options."""
    return {**BACKBONES[args.arch], **args.arch_options}


def pretrained_checkpoint(args: argparse.Namespace) -> Path:
    """The cached foundation model; trained by `fedge pretrain` the first time (named by everything that shapes it)."""
    options = backbone_options(args)
    recipe = json.dumps([options, args.pretrain_lr, args.pretrain_augment], sort_keys=True)
    name = f"{args.arch}-{zlib.crc32(recipe.encode()):08x}-{args.pretrain_dataset}-e{args.pretrain_epochs}.safetensors"
    out = Path(args.cache).resolve() / name
    if out.is_file():
        return out
    cmd = [sys.executable, "-m", "fedge.cli.main", "pretrain", "--dataset", args.pretrain_dataset, "--arch", args.arch,
           "--epochs", str(args.pretrain_epochs), "--lr", str(args.pretrain_lr), "--out", str(out)]  # fmt: skip
    cmd += [arg for k, v in options.items() for arg in ("--option", f"{k}={json.dumps(v)}")]
    cmd += ["--augment"] if args.pretrain_augment else []
    if args.data_dir:
        cmd += ["--data-dir", str(Path(args.data_dir).resolve())]
    print(f"pretraining the backbone (cached afterwards): {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)  # save_checkpoint writes atomically: only a finished run is cached
    return out


def site_model(mode_name: str, options: dict[str, Any], checkpoint: Path, task: Any, seed: int) -> tuple[Any, Any, Any]:
    """What a site trains in `mode_name`: the pretrained backbone, pruned/wrapped as the mode says
    (the server prunes in the federation; pruning is deterministic, so this is the same model)."""
    import torch

    from fedge.checkpoint import init_from_checkpoint
    from fedge.modes import get_mode

    splits = task.splits
    torch.manual_seed(seed)
    model, config = init_from_checkpoint(
        str(checkpoint),
        in_channels=splits.channels,
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        dataset=splits.name,
    )
    mode = get_mode(mode_name, **options)
    model, config, stats = mode.global_model(model, config)
    return mode, mode.prepare(model, config), stats


def footprint(mode_name: str, args: argparse.Namespace, checkpoint: Path, queue: Any) -> None:
    """Agent-side cost of one training step in one mode; runs in its own process, puts a dict on `queue`."""
    import torch

    from fedge.data import dirichlet_split, load_medmnist
    from fedge.modes import measure_step
    from fedge.tasks import ClassificationTask, LocalTrainer

    torch.set_num_threads(args.threads)
    # compression.lora imports peft (and transformers, ~100 MB of code) only when LoRA is used: load it
    # in every mode's process so that library pages do not count as LoRA's training memory.
    import peft  # noqa: F401
    import psutil

    task = ClassificationTask(load_medmnist(args.dataset, args.data_dir))
    mode, model, stats = site_model(mode_name, mode_options(mode_name, args), checkpoint, task, args.seed)
    shard = dirichlet_split(task.splits.labels["train"], args.clients, args.alpha, args.seed)[0]
    trainer = LocalTrainer(model, lr=args.lr[mode_name])  # the agent's step: Adam over the trainable parameters
    x, y = trainer.batch(task.splits.images["train"][shard[: args.batch_size]], task.splits.labels["train"][shard[: args.batch_size]])

    before = psutil.Process().memory_info().rss
    cost = measure_step(lambda: trainer.step(x, y), repeats=args.step_repeats)
    total = sum(p.numel() for p in model.parameters())
    queue.put(
        {
            "mode": mode_name,
            "trainable_params": mode.trainable_params(model),
            "model_params": total,
            "trained_tensors": len(mode.trainable_state(model)),
            "peak_train_mem_mb": round(cost.peak_mem_mb, 1),
            # what the steps add on top of the process (libraries, data, model): grads, optimizer state, activations
            "step_mem_mb": round(cost.peak_mem_mb - before / 2**20, 1),
            "step_seconds": round(cost.step_seconds, 4),
            "step_batch": len(y),
            "prune": dataclasses.asdict(stats) if stats is not None else None,
        }
    )


# glibc's dynamic mmap threshold keeps freed tensors in the heap, so RSS becomes a high-water mark
# of whatever was allocated before (checkpoint loading, wrapping) and hides what a step holds live.
# A fixed threshold returns every large tensor to the OS when it is freed: RSS then follows live
# memory (the CPU analogue of CUDA's max allocated). It also makes steps slower (mmap per tensor),
# so time comes from a second process with the default allocator.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _footprint_process(mode_name: str, args: argparse.Namespace, checkpoint: Path, env: dict[str, str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=footprint, args=(mode_name, args, checkpoint, queue), name=f"footprint-{mode_name}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the spawned interpreter inherits the environment at start
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        result = queue.get(timeout=args.footprint_timeout)  # before join: a full queue would block the child's exit
    except Exception:  # noqa: BLE001 - queue.Empty, or the child died
        proc.join(timeout=5)
        raise SystemExit(f"measuring mode {mode_name!r} failed (exit code {proc.exitcode}); see the traceback above") from None
    proc.join()
    return result


def measure_footprint(mode_name: str, args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """Memory from a fresh process with LIVE_MEMORY_ENV, seconds (and the default allocator's RSS) from another."""
    live = _footprint_process(mode_name, args, checkpoint, LIVE_MEMORY_ENV)
    default = _footprint_process(mode_name, args, checkpoint, {})
    return {
        **live,
        "step_seconds": default["step_seconds"],
        "peak_rss_default_malloc_mb": default["peak_train_mem_mb"],
        "step_mem_default_malloc_mb": default["step_mem_mb"],
    }


def federate(mode_name: str, seed: int, args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    from fedge.cli.federation import FederationSettings, run_federation

    settings = FederationSettings(
        dataset=args.dataset, data_dir=args.data_dir, clients=args.clients, rounds=args.rounds, codec=args.codec,
        arch=args.arch, seed=seed, alpha=args.alpha, epochs=args.epochs, lr=args.lr[mode_name],
        augment=args.augment, lr_schedule=args.lr_schedule,
        batch_size=args.batch_size, workdir=Path(args.workdir) / f"{mode_name}-s{seed}",
        mode=mode_name, mode_options=mode_options(mode_name, args), init=checkpoint,
    )  # fmt: skip
    return run_federation(settings)


def learning_bounds(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """Centralized and local-only full fine-tuning of the pretrained backbone, with full mode's lr,
    the federations' split and seeds and the same passes over the data (fedge.tasks.bounds)."""
    import torch

    from fedge.data import load_medmnist
    from fedge.tasks import ClassificationTask
    from fedge.tasks.bounds import BoundSettings, bounds_report

    torch.set_num_threads(os.cpu_count() or 1)  # nothing else runs by then: unlike the agents' footprint, use every core
    task = ClassificationTask(load_medmnist(args.dataset, args.data_dir))
    settings = BoundSettings(sites=args.clients, alpha=args.alpha, epochs=args.rounds * args.epochs, lr=args.lr["full"], batch_size=args.batch_size,
                             augment=args.augment, lr_schedule=args.lr_schedule)  # fmt: skip
    seeds = [args.seed + i for i in range(args.seeds)]
    return bounds_report(task, lambda seed: site_model("full", {}, checkpoint, task, seed)[1], settings, seeds)


def summarise(mode_name: str, runs: list[dict[str, Any]], cost: dict[str, Any], clients: int, full_dense_bytes: int) -> dict[str, Any]:
    """One `results` row from a mode's federations (one per seed) and its step footprint."""
    aucs = [r["final"]["auc"] for r in runs]
    per_round = statistics.mean(rd["uplink_bytes"] for r in runs for rd in r["rounds"])
    per_update = per_round / clients
    n_rounds = min(len(r["rounds"]) for r in runs)
    row: dict[str, Any] = {
        "mode": mode_name,
        "trainable_params": cost["trainable_params"],
        "uplink_bytes_per_round": per_round,
        "ratio_vs_full_fp32": full_dense_bytes / per_update,
        "final_auc": statistics.mean(aucs),
        "final_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
        "peak_train_mem_mb": cost["peak_train_mem_mb"],
        "step_seconds": cost["step_seconds"],
        # extras
        "step_mem_mb": cost.get("step_mem_mb"),
        "peak_rss_default_malloc_mb": cost.get("peak_rss_default_malloc_mb"),
        "model_params": cost["model_params"],
        "trainable_fraction": cost["trainable_params"] / cost["model_params"],
        "uplink_bytes_per_update": per_update,
        "seed_aucs": aucs,
        "mean_auc_by_round": [statistics.mean(r["rounds"][i]["auc"] for r in runs) for i in range(n_rounds)],
        "federation_seconds": [r["seconds"] for r in runs],
    }
    if cost.get("prune"):
        p = cost["prune"]
        row["prune"] = {**p, "mac_reduction": p["macs_before"] / max(p["macs_after"], 1),
                        "param_reduction": p["params_before"] / max(p["params_after"], 1)}  # fmt: skip
    return row


def acceptance(results: list[dict[str, Any]], backbone_params: int, bounds: dict[str, float] | None = None, dataset: str = "") -> dict[str, Any]:
    """Issue 4's acceptance, measured, and issue 13's once the bounds are in: each check holds its
    numbers and a verdict (None: mode not run)."""
    by = {r["mode"]: r for r in results}
    full, lora, pruned = by.get("full"), by.get("lora"), by.get("pruned")
    out: dict[str, Any] = {"backbone_params": backbone_params, "backbone_at_least_5m": backbone_params >= MIN_BACKBONE_PARAMS}
    if lora:
        out["lora_trainable_fraction"] = lora["trainable_fraction"]
        out["lora_trains_at_most_2pct"] = lora["trainable_fraction"] <= 0.02
        out["lora_ratio_vs_full_fp32"] = lora["ratio_vs_full_fp32"]
        out["lora_ratio_at_least_1000x"] = lora["ratio_vs_full_fp32"] >= 1000
    if lora and full:
        out["lora_auc_minus_full"] = lora["final_auc"] - full["final_auc"]
        out["lora_auc_within_0.02_of_full"] = lora["final_auc"] >= full["final_auc"] - 0.02
        out["lora_peak_mem_below_full"] = lora["peak_train_mem_mb"] < full["peak_train_mem_mb"]
    if pruned and "prune" in pruned:
        out["pruned_mac_reduction"] = pruned["prune"]["mac_reduction"]
    if pruned and full:
        out["pruned_auc_minus_full"] = pruned["final_auc"] - full["final_auc"]
        out["pruned_auc_within_0.02_of_full"] = pruned["final_auc"] >= full["final_auc"] - 0.02
    if bounds is not None:
        out.update(bounds_acceptance(results, bounds, dataset))
    verdicts = [v for k, v in out.items() if isinstance(v, bool)]
    out["all_hold"] = all(verdicts)
    return out


def bounds_acceptance(results: list[dict[str, Any]], bounds: dict[str, float], dataset: str) -> dict[str, Any]:
    """Issue 13's checks: centralized full fine-tuning reaches the published ResNet-18 (28) AUC, and
    federated full fine-tuning ends within 0.02 of it (None where the dataset or mode is missing)."""
    from fedge.tasks.bounds import PUBLISHED_RESNET18_28_AUC

    out: dict[str, Any] = {"published_resnet18_28_auc": PUBLISHED_RESNET18_28_AUC.get(dataset)}
    if out["published_resnet18_28_auc"] is not None:
        out["centralized_reaches_published"] = bounds["centralized_auc"] >= out["published_resnet18_28_auc"]
    full = next((r for r in results if r["mode"] == "full"), None)
    if full:
        out["full_minus_centralized"] = full["final_auc"] - bounds["centralized_auc"]
        out["full_within_0.02_of_centralized"] = out["full_minus_centralized"] >= -0.02
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True, help="JSON report to write")
    parser.add_argument("--data-dir", default=default_data_dir(), help="Folder with the MedMNIST npz files (default: FEDGE_DATA_DIR, else ../shared/data)")
    parser.add_argument("--dataset", default="pneumoniamnist", help="Federated dataset")
    parser.add_argument("--pretrain-dataset", default="breastmnist", help="Dataset the backbone is pretrained on (any but --dataset)")
    parser.add_argument("--arch", default="cnn", choices=sorted(BACKBONES), help="Backbone architecture (the zoo's); its defaults: " + json.dumps(BACKBONES))
    parser.add_argument(
        "--arch-options", type=parse_lora_options, default={}, help='Backbone options over the arch\'s defaults, e.g. widths=[32,64,128,1024] or preset="tiny"'
    )
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-augment", action=argparse.BooleanOptionalAction, default=True, help="Random flips and shifts in pretraining")
    parser.add_argument("--augment", action="store_true", help="Random flips and shifts in the federations and the bounds")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine", help="Each round's lr in the federations (the bounds per epoch)")
    parser.add_argument("--cache", default="runs/bench/cache", help="Where the pretrained checkpoint is kept")
    parser.add_argument("--workdir", default="runs/bench/modes", help="Federation workdirs (one per mode and seed)")
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated subset of full,lora,pruned,qat")
    parser.add_argument("--seeds", type=int, default=3, help="Federations per mode (seeds --seed, --seed+1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="First seed; footprints use it")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="Local epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label skew of the site split (lower: more non-IID)")
    parser.add_argument(
        "--lr", type=parse_lr, default=dict(DEFAULT_LR), help=f"Learning rate: one value, or per mode as full=5e-4,lora=3e-3 (default {DEFAULT_LR})"
    )
    parser.add_argument("--codec", default="q4,ef|zstd:3", help="The uplink codec every mode uses")
    parser.add_argument("--lora-r", type=int, default=DEFAULT_LORA_R)
    parser.add_argument(
        "--lora-targets",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=None,
        help="Comma-separated layer names that get adapters (peft target_modules); 'all' for every Linear/Conv2d but the head (default: "
        + json.dumps(LORA_TARGETS)
        + ")",
    )
    parser.add_argument("--lora-alpha", type=float, default=8.0)
    parser.add_argument(
        "--lora-options", type=parse_lora_options, default={}, help="More lora options as for --mode-options, e.g. train_norms=true,freeze_a=true"
    )
    parser.add_argument("--prune-ratio", type=float, default=0.5, help="Share of channels the server prunes in `pruned` mode")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads of the footprint step (agents train with 1)")
    parser.add_argument("--step-repeats", type=int, default=3, help="Timed steps per footprint (after one warm-up step)")
    parser.add_argument("--footprint-timeout", type=float, default=600.0)
    parser.add_argument("--footprints-only", action="store_true", help="Measure the per-mode step footprints, write them, skip the federations")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"unknown modes {unknown}; choose from {','.join(MODES)}")
    if args.seeds < 1 or args.rounds < 1 or args.clients < 1:
        parser.error("--seeds, --rounds and --clients must be >= 1")

    started = time.monotonic()
    checkpoint = pretrained_checkpoint(args)

    from fedge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    backbone_params = sum(v.numel() for v in ckpt.state.values() if v.is_floating_point())
    if backbone_params < MIN_BACKBONE_PARAMS:
        print(f"warning: the backbone has {backbone_params:,} parameters, under the 5M the benchmark is meant for", flush=True)

    costs = {}
    for m in modes:
        costs[m] = measure_footprint(m, args, checkpoint)
        c = costs[m]
        print(f"{m:>7}: {c['trainable_params']:>10,d} of {c['model_params']:>10,d} trainable, "
              f"{c['peak_train_mem_mb']:>8.1f} MB peak RSS (+{c['step_mem_mb']:.1f} MB by the steps), {c['step_seconds']:.3f} s/step", flush=True)  # fmt: skip

    settings = {k: v for k, v in vars(args).items() if k != "report"}
    settings.update(checkpoint=str(checkpoint), pretrained=ckpt.meta, modes=modes)
    report: dict[str, Any] = {"results": [], "settings": settings, "footprints": costs}
    full_dense_bytes = 4 * backbone_params  # a dense fp32 update of the whole (unpruned, unadapted) model
    if args.footprints_only:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({**report, "complete": False}, indent=2, default=str))
        print(f"footprints: {args.report}")
        return report
    for m in modes:
        runs = []
        for i in range(args.seeds):
            runs.append(federate(m, args.seed + i, args, checkpoint))
            print(f"{m:>7} seed {args.seed + i}: AUC {runs[-1]['final']['auc']:.4f}, {runs[-1]['seconds']:.0f}s "
                  f"({(time.monotonic() - started) / 60:.1f} min so far)", flush=True)  # fmt: skip
        row = summarise(m, runs, costs[m], args.clients, full_dense_bytes)
        report["results"].append(row)
        print(f"{m:>7}: AUC {row['final_auc']:.4f} ± {row['final_auc_std']:.4f}, "
              f"{row['uplink_bytes_per_update']:,.0f} B/update, ratio {row['ratio_vs_full_fp32']:,.0f}x", flush=True)  # fmt: skip
        report.update(
            acceptance=acceptance(report["results"], backbone_params),
            full_dense_update_bytes=full_dense_bytes,
            complete=m == modes[-1],
            minutes=round((time.monotonic() - started) / 60, 2),
        )
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, default=str))
    report.update(learning_bounds(args, checkpoint))
    report["acceptance"] = acceptance(report["results"], backbone_params, report["bounds"], args.dataset)
    report["minutes"] = round((time.monotonic() - started) / 60, 2)
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print(f"bounds: centralized AUC {report['bounds']['centralized_auc']:.4f}, local-only {report['bounds']['local_only_auc']:.4f}")
    print(json.dumps(report["acceptance"], indent=2))
    print(f"report: {args.report} ({report['minutes']:.1f} min)")
    return report


if __name__ == "__main__":
    main()
