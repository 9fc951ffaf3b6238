"""MedMNIST npz loading: from a local folder, else the official download checked against its MD5."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.files import file_digest

# MD5 values from medmnist 3.0.2 INFO; the download URL pattern is the official Zenodo record.
MEDMNIST_MD5 = {
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
}
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageSplits:
    """Images as uint8 NHWC (C = 1 or 3) and integer labels, per split; what every task consumes."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    name: str

    @property
    def channels(self) -> int:
        return self.images["train"].shape[-1]

    @property
    def image_size(self) -> int:
        return self.images["train"].shape[1]

    @property
    def num_classes(self) -> int:
        return int(max((int(lbl.max()) for lbl in self.labels.values() if lbl.size), default=0) + 1)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], name: str) -> "ImageSplits":
        """Validate a MedMNIST-layout mapping (`<split>_images`, `<split>_labels`)."""
        images: dict[str, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        for split in SPLITS:
            ki, kl = f"{split}_images", f"{split}_labels"
            if ki not in arrays or kl not in arrays:
                if split == "val":
                    continue
                raise ValueError(f"{name}: missing {ki!r}/{kl!r}; a MedMNIST npz holds train/val/test images and labels")
            x = np.asarray(arrays[ki])
            if x.ndim == 3:
                x = x[..., None]
            if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[1] != x.shape[2]:
                raise ValueError(f"{name}: {ki} has shape {x.shape}; expected (N, H, W) or (N, H, W, 3) square images")
            y = np.asarray(arrays[kl]).reshape(len(x), -1) if len(x) else np.zeros((0, 1), np.int64)
            if y.shape[1] != 1:
                raise ValueError(f"{name}: {kl} has {y.shape[1]} columns; multi-label subsets (ChestMNIST) are not supported yet")
            images[split] = x.astype(np.uint8, copy=False)
            labels[split] = y[:, 0].astype(np.int64)
        return cls(images=images, labels=labels, name=name)


# ../shared/data beside a source checkout: the development layout; an installed fedge uses FEDGE_DATA_DIR.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data root: `data_dir` (--data-dir), else FEDGE_DATA_DIR, else ../shared/data beside a
    source checkout, else None (the loader then downloads). The one lookup every command,
    benchmark and test uses."""
    value = data_dir or os.environ.get("FEDGE_DATA_DIR")
    if value:
        return Path(value).expanduser()
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def default_data_dir() -> str | None:
    """`data_root()` as a --data-dir default."""
    root = data_root()
    return None if root is None else str(root)


def find_medmnist(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """`<name>.npz` (or `medmnist/<name>.npz`) under the data root; never downloads."""
    root = data_root(data_dir)
    return None if root is None else _find_local(name, root)


def _find_local(name: str, data_dir: Path) -> Path | None:
    for candidate in (data_dir / f"{name}.npz", data_dir / "medmnist" / f"{name}.npz", data_dir):
        if candidate.is_file() and candidate.suffix == ".npz":
            return candidate
    return None


def _download(name: str, cache_dir: Path) -> Path:
    if name not in MEDMNIST_MD5:
        raise FileNotFoundError(
            f"{name}.npz is not in the data folder and fedge knows no checksum to download it with; "
            f"put {name}.npz in a folder and pass --data-dir DIR (or set FEDGE_DATA_DIR)"
        )
    target = cache_dir / f"{name}.npz"
    if target.is_file() and file_digest(target, "md5") == MEDMNIST_MD5[name]:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(MEDMNIST_URL.format(name=name), timeout=30) as resp, tmp.open("wb") as fh:
            while block := resp.read(1 << 20):
                fh.write(block)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download {name}.npz ({exc}); download it on a machine with access and pass "
            f"--data-dir DIR (a folder holding {name}.npz), or set FEDGE_DATA_DIR"
        ) from exc
    if file_digest(tmp, "md5") != MEDMNIST_MD5[name]:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"downloaded {name}.npz fails its MD5 check; retry, or pass --data-dir with a verified copy")
    tmp.replace(target)
    return target


def load_medmnist(name: str, data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> ImageSplits:
    """Load `<name>.npz` from the data root (`data_root`), else download into the cache."""
    name = name.lower().removesuffix(".npz")
    path = find_medmnist(name, data_dir)
    folder = data_root(data_dir)
    if path is None:
        if folder is not None and folder.exists() and name not in MEDMNIST_MD5:
            raise FileNotFoundError(
                f"no {name}.npz in {folder} (nor in {folder / 'medmnist'}); pass --data-dir (or FEDGE_DATA_DIR) pointing at the folder that holds it"
            )
        path = _download(name, Path(cache_dir or Path.home() / ".cache" / "fedge" / "medmnist"))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable MedMNIST npz: {exc}") from exc
    return ImageSplits.from_arrays(arrays, name)
