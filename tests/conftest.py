"""Shared fixtures: where the real data lives. Brokers are in brokers.py, DICOM in dicom_fixtures.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_medmnist_root() -> Path | None:
    for candidate in (os.environ.get("FEDGE_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and ((Path(candidate) / "medmnist" / "pneumoniamnist.npz").is_file() or (Path(candidate) / "pneumoniamnist.npz").is_file()):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    found = find_medmnist_root()
    if found is None:
        pytest.skip("MedMNIST npz files not found: set FEDGE_DATA_DIR to the data root or put them at ../shared/data/medmnist")
    return found
