"""One data-root lookup: --data-dir, else FEDGE_DATA_DIR, else ../shared/data beside the checkout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.data import data_root, find_medmnist, load_medmnist


def test_the_flag_wins_then_the_environment_then_the_shared_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedge.data.medmnist.SHARED_DATA", tmp_path / "shared")
    monkeypatch.delenv("FEDGE_DATA_DIR", raising=False)
    assert data_root() is None
    (tmp_path / "shared").mkdir()
    assert data_root() == tmp_path / "shared"
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"


def test_medmnist_is_found_under_the_root_or_its_medmnist_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path))
    (tmp_path / "medmnist").mkdir()
    arrays = {
        f"{s}_{k}": np.zeros((2, 4, 4), np.uint8) if k == "images" else np.array([[0], [1]]) for s in ("train", "val", "test") for k in ("images", "labels")
    }
    np.savez(tmp_path / "medmnist" / "sitemnist.npz", **arrays)

    assert find_medmnist("sitemnist") == tmp_path / "medmnist" / "sitemnist.npz"
    assert load_medmnist("sitemnist").num_classes == 2
    with pytest.raises(FileNotFoundError, match=f"no othermnist.npz in {tmp_path}"):
        load_medmnist("othermnist")
