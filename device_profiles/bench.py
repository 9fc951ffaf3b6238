"""`fedge bench`: what a device profile means on the host it runs on.

Measured here: inference latency (p50/p95/p99) and throughput per backend at batch 1 and a larger
batch; one local training step per training mode (seconds, peak memory); the bytes of one round up
(a real local delta through the profile's codec, enveloped and chunked as the agent sends it) and
down (the full global model as the server sends it). Projected: those bytes' transfer time on the
profile's link. Estimated, and kept apart: the roofline latency on the profile's hardware.

`run_bench` returns the report dict; `device_profiles.bench_report` writes it (JSON, Markdown, PNG).
"""

from __future__ import annotations

import functools
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from device_profiles.bench_backends import BACKENDS, BackendUnavailable, BenchContext
from device_profiles.bench_train import (
    ModelSource,
    TrainJob,
    TrainJobError,
    available_modes,
    local_delta,
    run_train_job,
)
from device_profiles.schema import Profile
from fedge.models import ModelConfig

DEFAULT_MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28)
DEFAULT_DATASET = "pneumoniamnist"
CALIB_SAMPLES = 512
TEST_SAMPLES = 512
LOCAL_EPOCH_SAMPLES = 256

StepCallback = Callable[[str, int, int], None]


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. `batch=None` takes the profile's batch size; `modes=None` every registered mode;
    `isolate` measures each training mode in a fresh process (off only to keep tests quick).

    `threads` defaults to 1, like the agent (AgentConfig.threads) and `fedge export`'s parity check,
    so figures compare across commands and are not at the mercy of other processes' load; raise it
    to the cores the agent will really use.
    """

    profile: Profile
    checkpoint: Path | None = None
    batch: int | None = None
    iters: int = 100
    warmup: int = 10
    threads: int = 1
    modes: tuple[str, ...] | None = None
    repeats: int = 5
    data_dir: Path | None = None
    synthetic: bool = False
    isolate: bool = True
    seed: int = 0
    workdir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("iters", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.batch is not None and self.batch < 2:
            raise ValueError(f"batch must be >= 2 (batch 1 is always measured; training needs 2 for BatchNorm), got {self.batch}")

    @property
    def large_batch(self) -> int:
        return self.batch or max(2, self.profile.defaults.batch_size)


@dataclass(frozen=True)
class BenchData:
    """Raw uint8 NHWC images and labels, and where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: dict[str, Any]


def load_data(config: ModelConfig, dataset: str, settings: BenchSettings) -> BenchData:
    """The dataset's local MedMNIST npz when it is on disk and fits the model (never downloaded:
    a bench must not need the network), else synthetic images of the model's input shape."""
    reason = "--synthetic was given"
    if not settings.synthetic:
        from fedge.data import data_root, find_medmnist, load_medmnist

        path = find_medmnist(dataset, settings.data_dir)  # the loader's own lookup: --data-dir, FEDGE_DATA_DIR, ../shared/data
        if path is None:
            reason = f"no {dataset}.npz under {data_root(settings.data_dir) or 'any data folder'} (pass --data-dir or set FEDGE_DATA_DIR)"
        else:
            splits = load_medmnist(dataset, path.parent)
            if (splits.channels, splits.image_size) != (config.in_channels, config.image_size) or splits.num_classes > config.num_classes:
                reason = (
                    f"{path} holds {splits.channels}-channel {splits.image_size}px images with {splits.num_classes} classes; "
                    f"the model takes {config.in_channels}-channel {config.image_size}px with {config.num_classes} classes"
                )
            else:
                return BenchData(
                    splits.images["train"][:CALIB_SAMPLES], splits.labels["train"][:CALIB_SAMPLES],
                    splits.images["test"][:TEST_SAMPLES], splits.labels["test"][:TEST_SAMPLES],
                    {"kind": "medmnist", "dataset": dataset, "path": str(path)},
                )  # fmt: skip
    rng = np.random.default_rng(settings.seed)
    shape = (config.image_size, config.image_size, config.in_channels)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)

    def labels(n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64) % config.num_classes  # every class present, so the AUC is defined

    return BenchData(
        images(CALIB_SAMPLES), labels(CALIB_SAMPLES), images(TEST_SAMPLES), labels(TEST_SAMPLES),
        {"kind": "synthetic", "reason": reason, "note": "uniform random images: latency, memory and bytes are real, accuracy figures are meaningless"},
    )  # fmt: skip


def _take(array: np.ndarray, n: int) -> np.ndarray:
    """The first n rows, repeating the array when it is shorter."""
    reps = -(-n // len(array))
    return np.concatenate([array] * reps)[:n] if reps > 1 else array[:n]


def host_info(threads: int, train_device: str) -> dict[str, Any]:
    import psutil

    from device_profiles.bench_backends import _ort
    from device_profiles.detect import cpu_name, detect

    cpu = cpu_name()
    ort = _ort()
    trt_version = None
    from exporters.tensorrt import is_available as trt_available

    if trt_available():
        import tensorrt

        trt_version = tensorrt.__version__
    found = detect()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cpus": usable_cpus(),
        "threads": threads,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 2),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": None if ort is None else ort.__version__,
        "onnxruntime_providers": [] if ort is None else ort.get_available_providers(),
        "tensorrt": trt_version,
        "training_device": train_device,
        "detected_profile": found.profile,
        "detected": found.found,
    }


def _inference(backend_cls: type, ctx: BenchContext, inputs: dict[int, np.ndarray], report: dict[str, Any]) -> None:
    from exporters import ExportError, measure_latency

    backend = backend_cls()
    label = backend.label(ctx)
    reason = backend.unavailable(ctx)
    if reason is None:
        try:
            run = backend.load(ctx)
            for batch, x in inputs.items():
                stats = measure_latency(functools.partial(run, x), ctx.warmup, ctx.iters, batch_size=batch)
                report["inference"].append(
                    {"backend": label, "batch": batch, "p50_ms": stats.p50_ms, "p95_ms": stats.p95_ms, "p99_ms": stats.p99_ms,
                     "throughput": stats.throughput, "mean_ms": stats.mean_ms, "iters": stats.iters, "device": backend.device}
                )  # fmt: skip
            return
        except (BackendUnavailable, ExportError) as exc:
            reason = str(exc)
        except Exception as exc:  # a GPU runtime's own error types; the report says what broke
            if backend.device == "cpu":
                raise
            reason = f"failed on this host: {type(exc).__name__}: {exc}"
    report["unavailable"].append({"kind": "inference", "backend": label, "reason": reason})


def _training(mode: str, job: TrainJob, isolate: bool, report: dict[str, Any]) -> None:
    try:
        report["training"].append(run_train_job(job, isolate))
    except ImportError as exc:
        report["unavailable"].append({"kind": "training", "mode": mode, "reason": f"a dependency is missing: {exc}"})
    except TrainJobError as exc:
        reason = str(exc) if exc.missing_dependency else f"failed: {exc}"
        report["unavailable"].append({"kind": "training", "mode": mode, "reason": reason})
    except Exception as exc:  # noqa: BLE001 - one mode failing (e.g. on a custom architecture) must not hide the others
        report["unavailable"].append({"kind": "training", "mode": mode, "reason": f"failed: {type(exc).__name__}: {exc}"})


def _bandwidth(settings: BenchSettings, source: ModelSource, data: BenchData, device: str) -> dict[str, Any]:
    from compression import ErrorFeedback
    from fedge import weights as W
    from fedge.linkemu import LinkEmulator
    from fedge.protocol import decode_envelope, split_chunks
    from fedge.rounds import FULL_MODEL_CODEC, codec_for, make_global, make_update

    profile = settings.profile
    mode = profile.defaults.training_mode
    note = None
    n = min(LOCAL_EPOCH_SAMPLES, len(data.train_labels))
    try:
        local = local_delta(mode, source, data.train_images[:n], data.train_labels[:n], settings.large_batch, device)
    except Exception as exc:  # fall back to the dense baseline, and say so
        if mode == "full":
            raise
        note = f"the profile's training mode {mode} failed here ({type(exc).__name__}: {exc}); the delta is from full"
        mode = "full"
        local = local_delta(mode, source, data.train_images[:n], data.train_labels[:n], settings.large_batch, device)
    delta, global_state = local["delta"], local["global"]
    codec = codec_for(profile.defaults.codec)
    start = time.perf_counter()
    up_envelope = make_update(
        delta, codec=codec.spec, federation="bench", site="bench-site", round=1, run=None, model_sha256=None, num_samples=local["samples"],
        metrics={"train_loss": 0.0, "train_accuracy": 0.0, "train_seconds": 0.0},
        residual=ErrorFeedback() if codec.uses_error_feedback else None, seed=settings.seed,
    )  # fmt: skip
    encode_seconds = time.perf_counter() - start
    payload_bytes = decode_envelope(up_envelope).header.payload_len
    down_envelope, _ = make_global(global_state, config=local["config"], federation="bench", run=None,
                                   round=1, sender="bench-server")  # fmt: skip
    chunk_size = profile.defaults.chunk_size
    up_chunks = split_chunks(up_envelope, chunk_size)
    down_chunks = split_chunks(down_envelope, chunk_size)
    # What the link emulator throttles: every MQTT payload, i.e. every encoded chunk.
    up_bytes = sum(len(c.encode()) for c in up_chunks)
    down_bytes = sum(len(c.encode()) for c in down_chunks)
    up_s, down_s = LinkEmulator(profile.link.uplink_mbps, profile.link.downlink_mbps).projected_seconds(up_bytes, down_bytes)
    return {
        "codec": codec.spec,
        "uplink_bytes": up_bytes,
        "downlink_bytes": down_bytes,
        "uplink_seconds": up_s,
        "downlink_seconds": down_s,
        "kind": "bytes measured here, seconds projected on the profile's link",
        "training_mode": mode,
        "local_steps": local["steps"],
        "local_samples": local["samples"],
        "uplink_payload_bytes": payload_bytes,
        "dense_fp32_bytes": W.dense_bytes(delta),
        "compression_ratio": W.dense_bytes(delta) / payload_bytes,
        "encode_seconds": encode_seconds,
        "downlink_codec": FULL_MODEL_CODEC,
        "downlink_kind": "full",
        "chunk_size": chunk_size,
        "uplink_chunks": len(up_chunks),
        "downlink_chunks": len(down_chunks),
        "uplink_mbps": profile.link.uplink_mbps,
        "downlink_mbps": profile.link.downlink_mbps,
        "note": note or "envelopes unsigned (an Ed25519 signature adds 64 bytes); no MQTT/TCP framing counted",
    }


def _estimate(ctx: BenchContext, input_chw: tuple[int, int, int]) -> dict[str, Any]:
    from device_profiles.roofline import estimate_latency

    rows = [estimate_latency(ctx.model, (b, *input_chw), ctx.profile) for b in ctx.batch_sizes]
    first = rows[0]
    return {
        "kind": "estimate",
        "method": "roofline",
        "note": "theoretical lower bound from the profile's spec-sheet peaks, not a measurement; never compare it as one",
        "profile": ctx.profile.name,
        "device": ctx.profile.device.name,
        "precision": first["precision"],
        "peak_ops_per_s": first["peak_ops_per_s"],
        "memory_bandwidth_bytes_per_s": first["memory_bandwidth_bytes_per_s"],
        "missing": first["missing"],
        "batches": [
            {
                "batch": b,
                "latency_ms": r["latency_ms"],
                "throughput": None if not r["latency_ms"] else b * 1000.0 / r["latency_ms"],
                "compute_ms": r["compute_ms"],
                "memory_ms": r["memory_ms"],
                "bound": r["bound"],
                "flops": r["flops"],
                "bytes": r["bytes"],
                "arithmetic_intensity": r["arithmetic_intensity"],
            }
            for b, r in zip(ctx.batch_sizes, rows)
        ],
    }


def run_bench(settings: BenchSettings, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Measure everything `fedge bench` reports; `on_step(label, done, total)` before each stage."""
    notify = on_step or (lambda _label, _done, _total: None)
    modes = available_modes()
    wanted = list(settings.modes) if settings.modes is not None else modes
    unknown = sorted(set(wanted) - set(modes))
    if unknown:
        raise ValueError(f"unknown training modes {unknown}; choose from {', '.join(modes)}")
    total = 1 + len(BACKENDS) + len(wanted) + 2
    done = 0

    def stage(label: str) -> None:
        nonlocal done
        notify(label, done, total)
        done += 1

    started = time.perf_counter()
    stage("loading the model and data")
    if settings.checkpoint is not None:
        from fedge.checkpoint import load_checkpoint

        ckpt = load_checkpoint(settings.checkpoint)
        source = ModelSource(ckpt.config, checkpoint=str(Path(settings.checkpoint).resolve()))  # for the training subprocesses
        dataset = str(ckpt.meta.get("dataset") or DEFAULT_DATASET)
        model = ckpt.build()  # the file is read once here; source.build() would read it again
    else:
        source, dataset = ModelSource(DEFAULT_MODEL, seed=settings.seed), DEFAULT_DATASET
        model = source.build()
    config = source.config
    data = load_data(config, dataset, settings)
    train_device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_sizes = (1, settings.large_batch)
    report: dict[str, Any] = {
        "profile": settings.profile.name,
        "host": host_info(settings.threads, train_device),
        "inference": [],
        "training": [],
        "bandwidth": {},
        "estimate": {},
        "unavailable": [],
        "measured_on": "inference, training and bytes are measured on this host; transfer seconds are projected on the "
        "profile's link; the estimate is a roofline for the profile's device",
        "model": {
            "arch": config.arch,
            "source": source.description,
            "input_shape": [config.in_channels, config.image_size, config.image_size],
            "num_classes": config.num_classes,
            "params": int(sum(p.numel() for p in model.parameters())),
        },
        "data": data.source,
        "settings": {
            "batch_sizes": list(batch_sizes),
            "iters": settings.iters,
            "warmup": settings.warmup,
            "threads": settings.threads,
            "train_repeats": settings.repeats,
            "isolated_training": settings.isolate,
        },
    }
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
            ctx = BenchContext(
                model=model, config=config, profile=settings.profile, calib=data.train_images, test_set=(data.test_images, data.test_labels),
                batch_sizes=batch_sizes, workdir=Path(settings.workdir or tmp), threads=settings.threads, warmup=settings.warmup, iters=settings.iters,
            )  # fmt: skip
            from fedge.tasks import preprocess

            x = preprocess(data.test_images).numpy()
            inputs = {b: np.ascontiguousarray(_take(x, b)) for b in batch_sizes}
            for backend_cls in BACKENDS.values():
                stage(f"inference: {backend_cls().label(ctx)}")
                _inference(backend_cls, ctx, inputs, report)
            report["exports"] = ctx.exports

            images, labels = _take(data.train_images, settings.large_batch), _take(data.train_labels, settings.large_batch)
            for mode in wanted:
                stage(f"training step: {mode}")
                job = TrainJob(mode, source, images, labels, train_device, settings.threads, settings.repeats)
                _training(mode, job, settings.isolate, report)

            stage(f"bandwidth: {settings.profile.defaults.codec}")
            report["bandwidth"] = _bandwidth(settings, source, data, train_device)
            stage("roofline estimate")
            report["estimate"] = _estimate(ctx, (config.in_channels, config.image_size, config.image_size))
    finally:
        torch.set_num_threads(previous_threads)
    report["seconds"] = time.perf_counter() - started
    notify("done", total, total)
    return report
