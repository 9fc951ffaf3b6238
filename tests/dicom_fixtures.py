"""Fixtures for the ingest tests: the real DICOM under FEDGE_DATA_DIR (or ../shared/data) and dcmtk.

Import the fixtures into a test module (`from dicom_fixtures import data_dir`); nothing here copies
data into the repository.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]


def find_data_dir() -> Path | None:
    """FEDGE_DATA_DIR (the root data folder), else ../shared/data beside the repository."""
    for candidate in (os.environ.get("FEDGE_DATA_DIR"), _REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "dicom").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = find_data_dir()
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
