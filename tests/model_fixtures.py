"""Shared models and benchmark scripts for tests (a pytest plugin: see conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import benchmarks/<name>.py under a private module name (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"fedge_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def trained_cnn(medmnist_root):
    """A small CNN trained briefly on PneumoniaMNIST (AUC well above chance): (model, config, splits)."""
    import numpy as np
    import torch

    from fedge.data import load_medmnist
    from fedge.models import build_model
    from fedge.tasks import ClassificationTask

    splits = load_medmnist("pneumoniamnist", medmnist_root)
    task = ClassificationTask(splits)
    config = task.model_config("cnn", widths=[16, 32])
    torch.manual_seed(0)
    model = build_model(config)
    task.train_local(model, np.arange(512), epochs=1, batch_size=64)
    return model, config, splits
