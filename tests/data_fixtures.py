"""Where the real data lives (never copied into the repository) and the tools that feed it.

The data root is FEDGE_DATA_DIR, else ../shared/data beside the repository; it holds medmnist/,
dicom/, ct/ and bad_inputs/ (see SOURCES.md there). Fixtures skip with the fix when data is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedge.data.medmnist import data_root


def find_data_root(marker: str) -> Path | None:
    """The data root (fedge.data.data_root) when it holds `marker` (a relative path such as 'dicom').

    Absolute, so that symlinks the tests make to data files resolve wherever they are made.
    """
    root = data_root()
    return root.absolute() if root is not None and (root / marker).exists() else None


def find_medmnist_root() -> Path | None:
    return find_data_root("medmnist/pneumoniamnist.npz") or find_data_root("pneumoniamnist.npz")


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    found = find_medmnist_root()
    if found is None:
        pytest.skip("MedMNIST npz files not found: set FEDGE_DATA_DIR to the data root or put them at ../shared/data/medmnist")
    return found


@pytest.fixture(scope="session")
def breast_task(medmnist_root: Path):
    """BreastMNIST (546 train images) as a classification task: what most federation tests train on. Read-only."""
    from fedge.data import load_medmnist
    from fedge.tasks import ClassificationTask

    return ClassificationTask(load_medmnist("breastmnist", medmnist_root))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = find_data_root("dicom")
    if found is None:
        pytest.skip("real DICOM not found: set FEDGE_DATA_DIR to the data root (with dicom/, ct/, bad_inputs/) or put it at ../shared/data")
    return found


def data_path(root: Path, *parts: str) -> Path:
    """A folder or file under the data root; skips (with the path) when this copy of the data lacks it."""
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing from the data folder (see SOURCES.md there)")
    return path


@pytest.fixture(scope="session")
def storescu() -> str:
    path = shutil.which("storescu")
    if path is None:
        pytest.skip("dcmtk's storescu is not installed: apt-get install -y dcmtk")
    return path
