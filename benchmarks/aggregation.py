"""Sparse aggregation vs the dense weighted average Flower does, measured side by side in one run.

For each model size (ResNet layer shapes of ~1.2M and ~11M parameters) K clients each send a
top-1% int8 delta (`topk:0.01|q8`, really encoded and decoded). fedge aggregates the decoded
SparseTensors with SparseAccumulator; the baseline receives the same updates as dense float32
arrays and takes sum(w * u) / sum(w) layer by layer. Only the aggregation is timed: densifying for
the baseline (which Flower receives already dense) happens outside its timer. Each side runs
`--repeats` times, interleaved, and reports its best time. A second section quotes the size of a
few specs on a random 1.2M-parameter delta.

The robust section times every other registered strategy (`server.strategies`) on the same decoded
11M-parameter updates of all K clients, beside its dense numpy equivalent on the same updates as
one n x d float32 matrix (built off the clock, as a dense server would already hold it): median
(`np.median` per layer, what Flower's FedMedian does), trimmed mean (`np.partition`, Flower's
FedTrimmedAvg), Multi-Krum (pairwise distances from one Gram matrix product per layer, much faster
than Flower's per-pair norms), norm clipping and centered clipping (matrix-vector products).

    python benchmarks/aggregation.py --report reports/aggregation.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from compression import SparseAccumulator, SparseTensor, TensorSpec, UpdateCodec
from fedge.models import ModelConfig, build_model
from fedge.reconstruction import reconstruction_error
from fedge.weights import NORM_STAT_SUFFIXES
from server.strategies import STRATEGIES, ClientUpdate, get_strategy
from server.strategies.multikrum import krum_scores

MODELS = {
    "resnet-1.2M": {"widths": (32, 64, 128, 256), "blocks": (1, 1, 1, 1)},
    "resnet-11M": {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2)},
}
UPDATE_SPEC = "topk:0.01|q8"
RATIO_SPECS = ["fp16", "q8", "q4", "topk:0.01|q8|zstd", "topk:0.001|q8|zstd", "gtopk:0.01|q4|zstd", "topk:0.01|ternary|zstd"]


def model_manifest(options: dict[str, tuple[int, ...]]) -> list[TensorSpec]:
    state = build_model(ModelConfig(arch="resnet", options=dict(options))).state_dict()
    return [TensorSpec(name, tuple(t.shape)) for name, t in state.items() if t.is_floating_point()]


def random_delta(manifest: list[TensorSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s.name: rng.standard_normal(s.shape, dtype=np.float32) * np.float32(1e-3) for s in manifest}


def client_updates(manifest: list[TensorSpec], clients: int, seed: int) -> list[dict[str, np.ndarray | SparseTensor]]:
    """What the server holds after decoding each client's payload."""
    codec, rng = UpdateCodec.from_spec(UPDATE_SPEC), np.random.default_rng(seed)
    return [codec.decode(codec.encode(random_delta(manifest, rng), seed=i), manifest) for i in range(clients)]


def densify(update: dict[str, np.ndarray | SparseTensor]) -> list[np.ndarray]:
    return [u.to_dense() if isinstance(u, SparseTensor) else u for u in update.values()]


def time_fedge(manifest: list[TensorSpec], updates: list, weights: list[float]) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    acc = SparseAccumulator(manifest)
    for update, weight in zip(updates, weights):
        acc.add(update, weight)
    result = acc.result()
    return time.perf_counter() - start, result


def time_dense(updates: list, weights: list[float]) -> tuple[float, list[np.ndarray]]:
    """Flower's weighted average over dense layers; each update is densified off the clock, one at a time."""
    elapsed, total = 0.0, None
    for update, weight in zip(updates, weights):
        layers = densify(update)
        start = time.perf_counter()
        if total is None:
            total = [weight * layer for layer in layers]
        else:
            for acc, layer in zip(total, layers):
                acc += weight * layer
        elapsed += time.perf_counter() - start
    assert total is not None
    start = time.perf_counter()
    mean = [layer / sum(weights) for layer in total]
    return elapsed + time.perf_counter() - start, mean


def dense_matrix(updates: list, manifest: list[TensorSpec]) -> np.ndarray:
    """All updates as one n x d float32 matrix (what a dense server holds after decoding)."""
    out = np.zeros((len(updates), sum(s.numel for s in manifest)), dtype=np.float32)
    for row, update in zip(out, updates):
        row[:] = np.concatenate([layer.reshape(-1) for layer in densify(update)])
    return out


def dense_rule(name: str, x: np.ndarray, manifest: list[TensorSpec]) -> np.ndarray:
    """The dense numpy equivalent of strategy `name` (registry defaults) on the n x d matrix `x`:
    as the strategies do, vector rules see the trainable tensors only and BatchNorm statistics
    take the coordinate-wise median."""
    n = len(x)
    bounds = np.cumsum([0] + [s.numel for s in manifest])
    stats = [slice(a, b) for s, (a, b) in zip(manifest, itertools.pairwise(bounds)) if s.name.endswith(NORM_STAT_SUFFIXES)]
    weights = [slice(a, b) for s, (a, b) in zip(manifest, itertools.pairwise(bounds)) if not s.name.endswith(NORM_STAT_SUFFIXES)]
    out = np.zeros(x.shape[1], dtype=np.float32)
    for sl in stats if name != "median" else stats + weights:
        out[sl] = np.median(x[:, sl], axis=0)
    if name == "trimmed_mean":
        b = int(np.floor(get_strategy(name).beta * n))
        for sl in weights:
            out[sl] = np.partition(x[:, sl], (b, n - b - 1), axis=0)[b : n - b].mean(axis=0)
    elif name == "multikrum":
        strategy = get_strategy(name)
        gram = sum(np.asarray(x[:, sl] @ x[:, sl].T, dtype=np.float64) for sl in weights)
        f = strategy.f if n >= 2 * strategy.f + 3 else max((n - 3) // 2, 0)
        chosen = np.sort(np.argsort(krum_scores(gram, f), kind="stable")[: n - f])
        for sl in weights:
            out[sl] = x[chosen, sl].mean(axis=0)
    elif name in ("clipping", "centered_clipping"):
        norms = np.sqrt(sum(np.einsum("ij,ij->i", x[:, sl], x[:, sl], dtype=np.float64) for sl in weights))
        if name == "clipping":
            scale = np.minimum(1.0, np.median(norms) / norms).astype(np.float32)
            for sl in weights:
                out[sl] = scale @ x[:, sl] / n
        else:
            for _ in range(get_strategy(name).iterations):
                dots = sum((x[:, sl] @ out[sl]).astype(np.float64) for sl in weights)
                dist = np.sqrt(np.maximum(norms**2 - 2 * dots + sum(float(out[sl] @ out[sl]) for sl in weights), 0.0))
                scale = np.where(dist > np.median(dist), np.median(dist) / dist, 1.0)
                for sl in weights:
                    out[sl] = out[sl] * np.float32(1 - scale.mean()) + scale.astype(np.float32) @ x[:, sl] / n
    elif name != "median":
        raise ValueError(f"no dense equivalent of strategy {name!r}")
    return out


def robust_rows(model: str, manifest: list[TensorSpec], updates: list, names: list[str], repeats: int) -> list[dict[str, object]]:
    """Each robust strategy on the decoded sparse updates vs its dense equivalent; best of `repeats` each."""
    clients = [ClientUpdate(f"client-{i:03d}", 100, u, 0) for i, u in enumerate(updates)]
    x = dense_matrix(updates, manifest)
    rows = []
    for name in names:
        strategy, fedge_times, dense_times = get_strategy(name), [], []
        for _ in range(repeats):
            start = time.perf_counter()
            fedge_result = strategy.aggregate(clients, manifest)
            fedge_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            dense_result = dense_rule(name, x, manifest)
            dense_times.append(time.perf_counter() - start)
        flat = np.concatenate([fedge_result[s.name].reshape(-1) for s in manifest])
        rows.append(
            {
                "strategy": name,
                "model": model,
                "clients": len(updates),
                "params": x.shape[1],
                "fedge_seconds": min(fedge_times),
                "dense_seconds": min(dense_times),
                "speedup": min(dense_times) / min(fedge_times),
                "max_abs_diff": float(np.abs(flat - dense_result).max()),
            }
        )
    return rows


def aggregation_rows(clients: list[int], seed: int, repeats: int, robust: list[str], robust_repeats: int) -> tuple[list, list]:
    """Best of `repeats` for both sides, so one noisy run (shared machine, cold pages) decides nothing.
    The robust rules run on the largest model's updates of all clients."""
    rows, robust_results = [], []
    for model, options in MODELS.items():
        manifest = model_manifest(options)
        params = sum(s.numel for s in manifest)
        updates = client_updates(manifest, max(clients), seed)
        for k in clients:
            weights = [float(n) for n in np.random.default_rng(seed + k).integers(50, 500, size=k)]
            fedge_times, dense_times = [], []
            for _ in range(repeats):  # interleaved, so load from other processes hits both sides alike
                seconds, fedge_mean = time_fedge(manifest, updates[:k], weights)
                fedge_times.append(seconds)
                seconds, dense_mean = time_dense(updates[:k], weights)
                dense_times.append(seconds)
            fedge_s, dense_s = min(fedge_times), min(dense_times)
            max_diff = max(float(np.abs(f.reshape(-1) - d.reshape(-1)).max()) for f, d in zip(fedge_mean.values(), dense_mean))
            rows.append(
                {
                    "model": model,
                    "clients": k,
                    "params": params,
                    "fedge_seconds": fedge_s,
                    "dense_seconds": dense_s,
                    "speedup": dense_s / fedge_s,
                    "max_abs_diff": max_diff,
                }
            )
        if model == list(MODELS)[-1] and robust:
            robust_results = robust_rows(model, manifest, updates, robust, robust_repeats)
        del updates
    return rows, robust_results


def ratio_rows(seed: int) -> list[dict[str, object]]:
    manifest = model_manifest(MODELS["resnet-1.2M"])
    delta = random_delta(manifest, np.random.default_rng(seed))
    fp32_bytes = 4 * sum(s.numel for s in manifest)
    rows = []
    for spec in RATIO_SPECS:
        codec = UpdateCodec.from_spec(spec)
        start = time.perf_counter()
        payload = codec.encode(delta, seed=seed)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded = codec.decode(payload, manifest)
        decode_s = time.perf_counter() - start
        rows.append({"codec": codec.spec, "bytes": len(payload), "ratio_vs_fp32": fp32_bytes / len(payload),
                     "relative_l2_error": reconstruction_error(delta, decoded).relative_l2, "encode_ms": 1e3 * encode_s,
                     "decode_ms": 1e3 * decode_s})  # fmt: skip
    return rows


def print_tables(report: dict[str, list[dict[str, object]]]) -> None:
    console = Console()
    table = Table(title=f"Aggregation of {UPDATE_SPEC} updates: SparseAccumulator vs dense weighted mean")
    for col in ("model", "clients", "params", "fedge s", "dense s", "speedup", "max |diff|"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            str(r["model"]),
            str(r["clients"]),
            f"{r['params']:,}",
            f"{r['fedge_seconds']:.3f}",
            f"{r['dense_seconds']:.3f}",
            f"{r['speedup']:.1f}x",
            f"{r['max_abs_diff']:.1e}",
        )
    console.print(table)
    if report.get("robust"):
        first = report["robust"][0]
        table = Table(title=f"Robust rules on {first['clients']} x {first['params']:,}-parameter {UPDATE_SPEC} updates: sparse vs dense numpy")
        for col in ("strategy", "fedge s", "dense s", "speedup", "max |diff|"):
            table.add_column(col, justify="right")
        for r in report["robust"]:
            table.add_row(str(r["strategy"]), f"{r['fedge_seconds']:.2f}", f"{r['dense_seconds']:.2f}", f"{r['speedup']:.1f}x", f"{r['max_abs_diff']:.1e}")
        console.print(table)
    table = Table(title="Codec size on a random 1.2M-parameter delta")
    for col in ("codec", "bytes", "ratio vs fp32", "rel. L2 error", "encode ms", "decode ms"):
        table.add_column(col, justify="right")
    for r in report["codec_ratios"]:
        table.add_row(
            str(r["codec"]), f"{r['bytes']:,}", f"{r['ratio_vs_fp32']:.1f}x", f"{r['relative_l2_error']:.3f}", f"{r['encode_ms']:.1f}", f"{r['decode_ms']:.1f}"
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100], help="client counts K to aggregate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side; the best is reported")
    robust = [name for name in STRATEGIES if name not in ("fedavg", "dp_fedavg")]  # dp_fedavg: clipping plus noise
    parser.add_argument("--robust", nargs="*", default=robust, choices=robust, help="robust strategies to time on the largest model (none: skip)")
    parser.add_argument("--robust-repeats", type=int, default=2, help="timed runs per side for each robust rule; the best is reported")
    args = parser.parse_args()
    results, robust_results = aggregation_rows(args.clients, args.seed, args.repeats, args.robust, args.robust_repeats)
    report = {
        "update_spec": UPDATE_SPEC,
        "repeats": args.repeats,
        "robust_repeats": args.robust_repeats,
        "results": results,
        "robust": robust_results,
        "codec_ratios": ratio_rows(args.seed),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)


if __name__ == "__main__":
    main()
