"""`fedge bench`'s training half: the model a site trains in each training mode, one local step's
time and peak memory (in a fresh process, so one mode's allocations never hide in another's), and
the delta a site would send after a short local epoch.

Training modes come from `fedge.modes`; where that module (or a mode's optional dependency: peft,
torch-pruning) is missing, the mode is reported as unavailable with the reason, never faked.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.models import ModelConfig, build_model
from fedge.tasks import LocalTrainer

BENCH_LR = 1e-3


@dataclass(frozen=True)
class ModelSource:
    """How to rebuild the benchmarked model anywhere (this process or a spawned one): a checkpoint
    file, or a model config initialised from `seed`."""

    config: ModelConfig
    checkpoint: str | None = None
    seed: int = 0

    def build(self) -> nn.Module:
        if self.checkpoint is not None:
            from fedge.checkpoint import load_checkpoint

            return load_checkpoint(self.checkpoint).build()
        torch.manual_seed(self.seed)
        return build_model(self.config).eval()

    @property
    def description(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        return f"default {self.config.arch}, random init (seed {self.seed})"


@dataclass(frozen=True)
class TrainJob:
    """One mode's step measurement; everything a spawned process needs (picklable)."""

    mode: str
    source: ModelSource
    images: np.ndarray  # uint8 NHWC, one batch
    labels: np.ndarray
    device: str
    threads: int
    repeats: int


def available_modes() -> list[str]:
    """Registered training mode names, `full` (the baseline) first."""
    from fedge.modes import MODES

    return sorted(MODES, key=lambda m: (m != "full", m))


def site_model(mode_name: str, source: ModelSource) -> tuple[Any, nn.Module, dict[str, np.ndarray], ModelConfig]:
    """(mode, the model a site trains in that mode, the plain global model's float state, its config).

    `pruned` first runs the server's pruning step (unless the checkpoint is pruned already), so the
    site trains (and receives) the smaller architecture every agent would rebuild from the config.
    """
    from fedge import weights as W
    from fedge.modes import get_mode

    mode = get_mode(mode_name)
    model, config, _ = mode.global_model(source.build(), source.config)
    global_state = W.float_state(model)  # a copy: prepare() wraps the model in place
    return mode, mode.prepare(model, config), global_state, config


def measure_train_step(job: TrainJob) -> dict[str, Any]:
    """Seconds per step and peak memory of one mode. CPU: peak RSS during the steps minus RSS just
    before them (optimizer state, gradients, activations); CUDA: max memory allocated (absolute)."""
    import psutil

    from fedge.modes import measure_step

    torch.set_num_threads(job.threads)
    mode, model, _global, _config = site_model(job.mode, job.source)
    trainer = LocalTrainer(model, lr=BENCH_LR, device=job.device)
    x, y = trainer.batch(job.images, job.labels)
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    footprint = measure_step(lambda: trainer.step(x, y), repeats=job.repeats, device=job.device)
    on_cuda = job.device.startswith("cuda")
    return {
        "mode": job.mode,
        "step_seconds": footprint.step_seconds,
        "peak_mem_mb": footprint.peak_mem_mb if on_cuda else max(0.0, footprint.peak_mem_mb - baseline_mb),
        "memory": "cuda_max_allocated" if on_cuda else "rss_delta",
        "peak_rss_mb": None if on_cuda else footprint.peak_mem_mb,
        "device": job.device,
        "batch": len(job.labels),
        "repeats": job.repeats,
        "trainable_params": int(mode.trainable_params(model)),
    }


class TrainJobError(RuntimeError):
    """A mode failed in its own process; `missing_dependency` when the failure was an ImportError."""

    def __init__(self, message: str, missing_dependency: bool = False) -> None:
        super().__init__(message)
        self.missing_dependency = missing_dependency


def run_train_job(job: TrainJob, isolate: bool) -> dict[str, Any]:
    """Measure in a fresh Python process (isolate=True, what `fedge bench` does) or in this one.

    The child is `python -m device_profiles.bench_train` with the pickled job on stdin (not
    multiprocessing, which would re-import the caller's __main__ module in the child).
    """
    if not isolate:
        return measure_train_step(job)
    # The child imports this installation's packages, whatever its working directory.
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-train-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, "-m", "device_profiles.bench_train", str(out)],
            input=pickle.dumps(job), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False,
        )  # fmt: skip
        if not out.is_file():
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise TrainJobError(f"the {job.mode} step process exited with {proc.returncode}: {' | '.join(tail) or 'no output'}")
        result = json.loads(out.read_text())
    if "error" in result:
        raise TrainJobError(result["error"], missing_dependency=result["missing_dependency"])
    return result


def _child_main(out: str) -> None:
    """Entry point of the isolated process: job on stdin (pickled, from our own parent), JSON result to `out`."""
    job = pickle.load(sys.stdin.buffer)  # written by run_train_job in the parent process
    try:
        result: dict[str, Any] = measure_train_step(job)
    except ImportError as exc:
        result = {"error": f"a dependency is missing: {exc}", "missing_dependency": True}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which lists the mode as unavailable
        result = {"error": f"{type(exc).__name__}: {exc}", "missing_dependency": False}
    Path(out).write_text(json.dumps(result))


def local_delta(mode_name: str, source: ModelSource, images: np.ndarray, labels: np.ndarray, batch: int, device: str) -> dict[str, Any]:
    """Train one local epoch over `images` in `mode_name`: the trainable-state delta (float32 numpy,
    the tensors the mode sends), and the plain global model's float state and config (what a full
    downlink carries)."""
    mode, model, global_state, config = site_model(mode_name, source)
    before = {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in mode.trainable_state(model).items()}
    trainer = LocalTrainer(model, lr=BENCH_LR, device=device)
    *_, steps = trainer.epoch(*trainer.batch(images, labels), batch)  # the sites' loop, in order
    after = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in mode.trainable_state(model).items()}
    return {
        "delta": {k: np.asarray(after[k] - before[k], dtype=np.float32) for k in before},  # 0-d stays an array
        "global": global_state,
        "config": config,
        "steps": steps,
        "samples": len(labels),
    }


if __name__ == "__main__":
    _child_main(sys.argv[1])
