"""Uplink compression vs dense fp32: the same seeded federation once per codec spec, side by side.

Every run is a real `run_federation` (embedded broker, round server, one agent process per site)
on PneumoniaMNIST split over `--clients` non-IID sites (Dirichlet `--alpha`), for `--rounds`
rounds, once per seed in `--seeds`, first with dense `fp32` and then with each spec in `--specs`.
Each run gets its own workdir under one temporary folder.

Per spec the report gives (list under "results"):
  uplink_bytes_per_round  mean over rounds and seeds of the bytes of all sites' update envelopes in a
                          round (header + payload as the server received them; no MQTT/chunk framing)
  ratio_vs_fp32           the fp32 runs' uplink_bytes_per_round / this spec's (both measured here)
  final_auc, _std         test AUC of the final global model: mean and sample std (ddof=1) over seeds
  auc_delta_vs_fp32       final_auc - the fp32 runs' final_auc (difference of means, same seeds)
  encode_ms, decode_ms    median of `--repeats` encodes/decodes of a real update: one site's local
                          training delta (the agent's own training step and seed) from the round
                          `--timing-round` global checkpoint of the first fp32 run
"bounds" gives the centralized AUC (the same seeded model trained on the pooled data) and the
local-only AUC (each site alone, mean over sites) for the same seeds, split and passes over the data
(rounds x epochs; fedge.tasks.bounds), with per-seed values under "bounds_detail".
BatchNorm running mean/var travel dense through the codec's keep_dense (fp16 under lossy specs,
fp32 under fp32), as the agent sends them; they are counted in every byte figure. The downlink is
the server's default full fp32 snapshot unless `--downlink-codec` is given (then every run, the fp32
baseline included, uses that delta downlink); its bytes are reported beside the uplink's.

    python benchmarks/codec_bench.py --report reports/compression.json
    python benchmarks/codec_bench.py --report /tmp/c.json --seeds 0 --rounds 2 --specs q8
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compression import ErrorFeedback, UpdateCodec
from fedge.data.medmnist import default_data_dir
from fedge.reconstruction import reconstruction_error

REPO = Path(__file__).resolve().parents[1]
BASELINE = "fp32"
DEFAULT_SPECS = [
    "fp16",
    "q8",
    "topk:0.01,ef|q8|zstd",
    "topk:0.01|q8|zstd",
    "topk:0.001,ef|q8|zstd",
    "topk:0.001|q8|zstd",
    "topk:0.01,ef|ternary|zstd",
    "topk:0.01|ternary|zstd",
    "topk:0.02,ef|ternary|zstd",  # ternary values are ~1.6 bits: twice the coordinates of q8 in about the same bytes
    "topk:0.02|ternary|zstd",
]
ACCEPT_RATIO = 100.0
ACCEPT_AUC = 0.01


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- federations ---------------------------------------------------------------------------------
def run_one(args: argparse.Namespace, spec: str, seed: int, workdir: Path) -> dict[str, Any]:
    from fedge.cli.federation import FederationSettings, run_federation

    settings = FederationSettings(
        dataset=args.dataset,
        data_dir=args.data_dir,
        clients=args.clients,
        rounds=args.rounds,
        codec=spec,
        downlink_codec=args.downlink_codec,
        seed=seed,
        alpha=args.alpha,
        epochs=args.epochs,
        lr=args.lr,
        federation=f"bench-{zlib.crc32(f'{spec}/{seed}'.encode()):08x}",
        workdir=workdir,
    )
    report = run_federation(settings)
    rounds = report["rounds"]
    if report["rejected_updates"]:
        raise RuntimeError(f"{spec} seed {seed}: the server rejected {report['rejected_updates']} updates")
    return {
        "codec": spec,
        "seed": seed,
        "final_auc": report["final"]["auc"],
        "final_accuracy": report["final"]["accuracy"],
        "auc_per_round": [r["auc"] for r in rounds],
        "uplink_bytes_per_round": statistics.fmean(r["uplink_bytes"] for r in rounds),
        "downlink_bytes_per_round": statistics.fmean(r["downlink_bytes"] for r in rounds),
        "dense_update_bytes": report["dense_update_bytes"],
        "seconds": report["seconds"],
    }


def learning_bounds(args: argparse.Namespace) -> dict[str, Any]:
    """Centralized and local-only training of the federation's model, split and seeds for the same
    passes over the data (fedge.tasks.bounds): {"bounds": {...}, "bounds_detail": {...}}."""
    import torch

    from fedge.data import load_medmnist
    from fedge.tasks import ClassificationTask
    from fedge.tasks.bounds import BoundSettings, bounds_report, seeded_model

    torch.set_num_threads(1)  # as each agent trains
    task = ClassificationTask(load_medmnist(args.dataset, args.data_dir))
    settings = BoundSettings(sites=args.clients, alpha=args.alpha, epochs=args.rounds * args.epochs, lr=args.lr)
    return bounds_report(task, seeded_model(task.model_config("cnn")), settings, args.seeds)  # run_federation's default model


# ---- codec timing on a real update ---------------------------------------------------------------
def real_update(args: argparse.Namespace, checkpoint: Path, seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """What site-1's agent would encode in the round after `checkpoint`: its local training delta."""
    import torch

    from edge_client.agent import train_seed
    from fedge import weights as W
    from fedge.checkpoint import load_checkpoint
    from fedge.data import dirichlet_split, load_medmnist
    from fedge.tasks import ClassificationTask

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build().train()
    before = W.float_state(model)
    task = ClassificationTask(load_medmnist(args.dataset, args.data_dir))
    indices = dirichlet_split(task.splits.labels["train"], args.clients, args.alpha, seed)[0]
    seed_1 = train_seed(seed, "site-1", int(ckpt.meta.get("round", 0)) + 1)
    torch.manual_seed(seed_1)
    task.train_local(model, indices, epochs=args.epochs, lr=args.lr, batch_size=32, seed=seed_1)
    delta = W.subtract(W.float_state(model), before)
    return delta, W.norm_stat_names(delta)


def time_codec(spec: str, delta: dict[str, np.ndarray], keep: list[str], repeats: int) -> dict[str, Any]:
    codec = UpdateCodec.from_spec(spec)
    manifest = UpdateCodec.manifest(delta)
    residual = ErrorFeedback()
    codec.encode(delta, residual=residual, keep_dense=keep, seed=0)  # warm-up; for ef specs a realistic residual
    warm = residual.state_dict()
    enc, dec = [], []
    for i in range(repeats):
        residual.load_state_dict(warm)
        start = time.perf_counter()
        payload = codec.encode(delta, residual=residual, keep_dense=keep, seed=i + 1)
        enc.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = codec.decode(payload, manifest)
        dec.append(time.perf_counter() - start)
    # Reconstruction error of a first-round encode (no residual yet) over the tensors the codec compresses:
    # the dense BatchNorm statistics hold most of an update's L2 norm and would hide the weights' error.
    decoded = codec.decode(codec.encode(delta, residual=ErrorFeedback(), keep_dense=keep, seed=0), manifest)
    relative_l2 = reconstruction_error(delta, decoded, skip=keep).relative_l2
    return {
        "encode_ms": 1e3 * statistics.median(enc),
        "decode_ms": 1e3 * statistics.median(dec),
        "payload_bytes_real_update": len(payload),
        "relative_l2_error": relative_l2,
    }


# ---- the report ----------------------------------------------------------------------------------
def summarize(
    args: argparse.Namespace, runs: list[dict[str, Any]], timing: dict[str, dict[str, Any]], dense_update_bytes: int, norm_stats: int
) -> dict[str, Any]:
    by_spec: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_spec.setdefault(run["codec"], []).append(run)
    base = by_spec[BASELINE]
    base_bytes = statistics.fmean(r["uplink_bytes_per_round"] for r in base)
    base_auc = statistics.fmean(r["final_auc"] for r in base)
    results = []
    for spec in [BASELINE, *args.specs]:
        rs = sorted(by_spec.get(spec, []), key=lambda r: r["seed"])
        if not rs:
            continue
        aucs = [r["final_auc"] for r in rs]
        up = statistics.fmean(r["uplink_bytes_per_round"] for r in rs)
        mean_auc = statistics.fmean(aucs)
        results.append(
            {
                "codec": spec,
                "uplink_bytes_per_round": up,
                "ratio_vs_fp32": base_bytes / up,
                "final_auc": mean_auc,
                "final_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "auc_delta_vs_fp32": mean_auc - base_auc,
                "encode_ms": timing[spec]["encode_ms"],
                "decode_ms": timing[spec]["decode_ms"],
                # extras
                "uplink_bytes_per_update": up / args.clients,
                "downlink_bytes_per_round": statistics.fmean(r["downlink_bytes_per_round"] for r in rs),
                "payload_bytes_real_update": timing[spec]["payload_bytes_real_update"],
                "relative_l2_error_real_update": timing[spec]["relative_l2_error"],  # weights only, BN stats excluded
                "seeds": [r["seed"] for r in rs],
                "final_auc_per_seed": aucs,
                "meets_acceptance": bool(base_bytes / up >= ACCEPT_RATIO and abs(mean_auc - base_auc) <= ACCEPT_AUC) if spec != BASELINE else None,
            }
        )
    by_codec = {r["codec"]: r for r in results}
    ef_pairs = []
    for spec in args.specs:
        codec = UpdateCodec.from_spec(spec)
        if not codec.error_feedback or codec.sparsifier is None:
            continue
        plain = UpdateCodec(codec.sparsifier, codec.values, codec.entropy, error_feedback=False).spec
        twin = next((s for s in by_codec if s != BASELINE and UpdateCodec.from_spec(s).spec == plain), None)
        if spec in by_codec and twin is not None:
            ef_pairs.append(
                {
                    "with_ef": spec,
                    "without_ef": twin,
                    "auc_gain_from_ef": by_codec[spec]["final_auc"] - by_codec[twin]["final_auc"],
                    "bytes_ratio_ef_over_plain": by_codec[spec]["uplink_bytes_per_round"] / by_codec[twin]["uplink_bytes_per_round"],
                }
            )
    fp32_payload = timing[BASELINE]["payload_bytes_real_update"]
    base_per_update = base_bytes / args.clients
    passing = [r["codec"] for r in results if r["meets_acceptance"]]
    return {
        "benchmark": "compression",
        "task": f"classification/{args.dataset}",
        "clients": args.clients,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "alpha": args.alpha,
        "epochs": args.epochs,
        "lr": args.lr,
        "arch": "cnn",
        "params": dense_update_bytes // 4,
        "dense_update_bytes": dense_update_bytes,
        "downlink": args.downlink_codec or "full fp32 snapshot (server default), same for every run",
        "norm_stats": (
            f"BatchNorm running_mean/running_var ({norm_stats} values) travel dense through keep_dense: fp16 under "
            "lossy specs, fp32 under fp32; never sparsified, and counted in every byte figure "
            f"({2 * norm_stats} bytes of fp16 per update before zstd)"
        ),
        "bytes_note": "uplink bytes are whole update envelopes as the server received them (header + payload, unsigned in "
        "the demo), summed over the sites of a round; MQTT and chunk framing not included",
        "envelope_overhead_bytes_per_update": base_per_update - fp32_payload,
        "timing": f"median of {args.repeats} encodes/decodes of site-1's local training delta from the fp32 seed-{args.seeds[0]} "
        f"round-{args.timing_round} global (ef specs carry the residual of one earlier encode)",
        "acceptance": {"ratio_at_least": ACCEPT_RATIO, "auc_within": ACCEPT_AUC, "passing_specs": passing, "met": bool(passing)},
        "ef_comparison": ef_pairs,
        "git": git_revision(),
        "results": results,
        "runs": runs,
    }


def print_table(report: dict[str, Any]) -> None:
    console = Console(width=max(Console().width, 150))
    table = Table(
        title=f"Uplink codecs on {report['task']}: {report['clients']} non-IID sites, {report['rounds']} rounds, "
        f"seeds {report['seeds']} (downlink: {report['downlink']})"
    )
    for col in ("codec", "B/round", "B/update", "ratio", "final AUC", "std", "Δ AUC", "enc ms", "dec ms", "rel err", "≥100x & ±0.01"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        ok = "" if r["meets_acceptance"] is None else ("yes" if r["meets_acceptance"] else "no")
        table.add_row(
            r["codec"],
            f"{r['uplink_bytes_per_round']:,.0f}",
            f"{r['uplink_bytes_per_update']:,.0f}",
            f"{r['ratio_vs_fp32']:.1f}x",
            f"{r['final_auc']:.4f}",
            f"{r['final_auc_std']:.4f}",
            f"{r['auc_delta_vs_fp32']:+.4f}",
            f"{r['encode_ms']:.2f}",
            f"{r['decode_ms']:.2f}",
            f"{r['relative_l2_error_real_update']:.3f}",
            ok,
        )
    console.print(table)
    for pair in report["ef_comparison"]:
        console.print(f"ef: {pair['with_ef']} vs {pair['without_ef']}: AUC {pair['auc_gain_from_ef']:+.4f}, bytes x{pair['bytes_ratio_ef_over_plain']:.2f}")
    console.print(f"envelope overhead per update: {report['envelope_overhead_bytes_per_update']:,.0f} B; {report['norm_stats']}")
    acc = report["acceptance"]
    console.print(
        f"acceptance (ratio >= {acc['ratio_at_least']:.0f}x, |Δ AUC| <= {acc['auc_within']}): "
        + (f"met by {', '.join(acc['passing_specs'])}" if acc["met"] else "not met")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="codec specs to compare with fp32")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label skew of the site split")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-dir", default=default_data_dir(), help="folder with the MedMNIST npz (default FEDGE_DATA_DIR or ../shared/data)")
    parser.add_argument("--downlink-codec", default=None, help="delta downlink spec for every run (default: full fp32 snapshot)")
    parser.add_argument("--repeats", type=int, default=20, help="timed encodes/decodes per spec")
    parser.add_argument("--timing-round", type=int, default=None, help="checkpoint round whose next local update is timed (default rounds//2)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs from an existing --report (same settings)")
    args = parser.parse_args()
    args.specs = [s for s in dict.fromkeys(args.specs) if s != BASELINE]
    for spec in args.specs:
        UpdateCodec.from_spec(spec)  # a typo fails now, not after the baseline
    args.timing_round = max(1, min(args.rounds, args.timing_round or args.rounds // 2))
    logging.basicConfig(level=logging.WARNING)
    console = Console()

    runs: list[dict[str, Any]] = []
    if args.resume and args.report.exists():
        previous = json.loads(args.report.read_text())
        if (previous.get("rounds"), previous.get("clients"), previous.get("alpha"), previous.get("epochs"), previous.get("lr")) == (
            args.rounds,
            args.clients,
            args.alpha,
            args.epochs,
            args.lr,
        ):
            runs = [r for r in previous.get("runs", []) if r["seed"] in args.seeds]
            console.print(f"resuming with {len(runs)} finished runs from {args.report}")
    done = {(r["codec"], r["seed"]) for r in runs}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedge-compression-bench-") as tmp:
        timing_ckpt: Path | None = None
        for seed in args.seeds:
            for spec in [BASELINE, *args.specs]:
                need_ckpt = spec == BASELINE and seed == args.seeds[0]
                if (spec, seed) in done and not need_ckpt:
                    continue
                workdir = Path(tmp) / f"{zlib.crc32(spec.encode()):08x}-seed{seed}"
                console.print(f"[bold]{spec}[/] seed {seed}: federating {args.rounds} rounds ...")
                run = run_one(args, spec, seed, workdir)
                console.print(f"  final AUC {run['final_auc']:.4f}, {run['uplink_bytes_per_round']:,.0f} uplink B/round, {run['seconds']:.0f} s")
                if need_ckpt:
                    timing_ckpt = workdir / "checkpoints" / f"round_{args.timing_round:04d}.safetensors"
                if (spec, seed) not in done:
                    runs.append(run)
                    done.add((spec, seed))
                    args.report.write_text(
                        json.dumps(
                            {
                                "partial": True,
                                "rounds": args.rounds,
                                "clients": args.clients,
                                "alpha": args.alpha,
                                "epochs": args.epochs,
                                "lr": args.lr,
                                "runs": runs,
                            },
                            indent=2,
                        )
                        + "\n"
                    )
        assert timing_ckpt is not None
        delta, keep = real_update(args, timing_ckpt, args.seeds[0])
    timing = {spec: time_codec(spec, delta, keep, args.repeats) for spec in [BASELINE, *args.specs]}
    dense = runs[0]["dense_update_bytes"]
    report = summarize(args, runs, timing, dense, sum(delta[k].size for k in keep))
    report.update(learning_bounds(args))
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    console.print(
        f"bounds (same model, split, seeds and passes): centralized AUC {report['bounds']['centralized_auc']:.4f}, "
        f"local-only {report['bounds']['local_only_auc']:.4f}"
    )


if __name__ == "__main__":
    main()
