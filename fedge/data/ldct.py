"""Low-dose CT from real CT: HU -> attenuation -> parallel-beam sinogram -> site protocol (photons,
views, electronic noise) -> Poisson counts -> filtered back-projection -> HU.

The transforms are scikit-image's (`radon`, `iradon`), not hand-written projectors. A site's
(low-dose, normal-dose) slice pairs are cached on disk under a key hashed from the source slices and
the protocol, so agents, the server's evaluator and the benchmark simulate each pair once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedge.errors import UsageError

MU_WATER = 0.02  # linear attenuation of water at ~70 keV effective energy, 1/mm
AIR_HU = -1024.0
CACHE_VERSION = 1  # bump when the simulation changes what it writes
I0_RANGE = (1e3, 1e7)
# Conditioning input of a protocol, scaled to about [0, 1] over the range sites use (I0 5e3..1e5, 60..720 views).
# Default site protocols (demo, benchmark): near normal dose down to low-dose sparse-view with electronic
# noise; and one no site uses, for the held-out evaluation.
SITE_PROTOCOLS = ("1e5:360", "3e4:360", "1e4:180", "5e3:90:5", "5e4:240", "7e3:120")
UNSEEN_PROTOCOL = "2e4:120"
_LOG_I0_SPAN = (math.log10(5e3), math.log10(1e5))
_VIEWS_SPAN = (60.0, 720.0)


@dataclass(frozen=True)
class ScanProtocol:
    """One site's acquisition: incident photons per detector bin (I0), projection views over 180
    degrees, and the standard deviation of additive electronic noise in counts."""

    i0: float
    views: int
    electronic_noise: float = 0.0

    def __post_init__(self) -> None:
        if not I0_RANGE[0] <= self.i0 <= I0_RANGE[1]:
            raise UsageError(f"protocol i0={self.i0:g}: use incident photons between {I0_RANGE[0]:g} and {I0_RANGE[1]:g} (low dose ~5e3..1e5)")
        if not 8 <= int(self.views) <= 4096:
            raise UsageError(f"protocol views={self.views}: use 8 to 4096 projection views")
        if self.electronic_noise < 0:
            raise UsageError(f"protocol electronic_noise={self.electronic_noise}: a standard deviation in counts, >= 0")
        object.__setattr__(self, "views", int(self.views))

    @classmethod
    def parse(cls, text: str) -> "ScanProtocol":
        """`I0:VIEWS[:NOISE]`, e.g. `1e4:180` or `5e3:90:5` (what --protocol takes)."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise UsageError(f"protocol {text!r}: write I0:VIEWS[:ELECTRONIC_NOISE], e.g. 1e4:180 or 5e3:90:5")
        try:
            return cls(float(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0)
        except ValueError as exc:
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"protocol {text!r}: I0 and noise are numbers, VIEWS an integer (e.g. 1e4:180)") from None

    def __str__(self) -> str:
        noise = f":{self.electronic_noise:g}" if self.electronic_noise else ""
        return f"{self.i0:g}:{self.views}{noise}"

    def condition(self) -> tuple[float, float]:
        """(log dose, views) scaled to about [0, 1]: the FiLM network's input."""
        lo, hi = _LOG_I0_SPAN
        return ((math.log10(self.i0) - lo) / (hi - lo), (self.views - _VIEWS_SPAN[0]) / (_VIEWS_SPAN[1] - _VIEWS_SPAN[0]))


@dataclass(frozen=True)
class SimulationConfig:
    """How slices become pairs: the resampled size and the normal-dose reference protocol."""

    image_size: int = 128
    reference: ScanProtocol = field(default_factory=lambda: ScanProtocol(1e6, 360))
    mu_water: float = MU_WATER

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise UsageError(f"image_size={self.image_size}: simulate at 16 to 1024 pixels (default 128; 256 or 512 are slower)")


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER) -> np.ndarray:
    """Linear attenuation (1/mm) from HU: mu = mu_water (1 + HU/1000), air 0."""
    return np.maximum(mu_water * (1.0 + hu / 1000.0), 0.0)


def mu_to_hu(mu: np.ndarray, mu_water: float = MU_WATER) -> np.ndarray:
    return (mu / mu_water - 1.0) * 1000.0


def resample(hu: np.ndarray, pixel_mm: float, size: int) -> tuple[np.ndarray, float]:
    """Pad to square with air and resize (antialiased) to size x size; returns (image, new pixel mm)."""
    from skimage.transform import resize

    h, w = hu.shape
    side = max(h, w)
    square = np.full((side, side), AIR_HU, dtype=np.float32)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = hu
    out = resize(square, (size, size), anti_aliasing=side > size, preserve_range=True).astype(np.float32)
    return out, pixel_mm * side / size


def scan(hu: np.ndarray, pixel_mm: float, protocol: ScanProtocol, rng: np.random.Generator, mu_water: float = MU_WATER) -> np.ndarray:
    """One simulated acquisition and FBP reconstruction of a square HU image; returns HU."""
    from skimage.transform import iradon, radon

    size = hu.shape[0]
    theta = np.linspace(0.0, 180.0, protocol.views, endpoint=False)
    line_integrals = radon(hu_to_mu(hu, mu_water), theta=theta, circle=False) * pixel_mm  # dimensionless
    counts = rng.poisson(protocol.i0 * np.exp(-line_integrals)).astype(np.float64)
    if protocol.electronic_noise:
        counts += rng.normal(0.0, protocol.electronic_noise, counts.shape)
    noisy = -np.log(np.maximum(counts, 1.0) / protocol.i0)  # a count below one is a photon-starved ray
    mu = iradon(noisy / pixel_mm, theta=theta, circle=False, output_size=size, filter_name="ramp")
    return mu_to_hu(mu, mu_water).astype(np.float32)


@dataclass(frozen=True)
class SlicePairs:
    """Simulated (low-dose, normal-dose) slices of one source under one protocol, in HU."""

    low: np.ndarray  # (n, S, S) float32
    normal: np.ndarray  # (n, S, S) float32
    protocol: ScanProtocol
    pixel_mm: float


def cache_key(hu: np.ndarray, pixel_mm: float, protocol: ScanProtocol, config: SimulationConfig, seed: int) -> str:
    """SHA-256 over the source slices' bytes and everything that decides the simulation."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(hu, dtype=np.float32).tobytes())
    digest.update(
        json.dumps(
            {
                "v": CACHE_VERSION,
                "pixel_mm": pixel_mm,
                "protocol": asdict(protocol),
                "size": config.image_size,
                "reference": asdict(config.reference),
                "mu_water": config.mu_water,
                "seed": seed,
                "shape": list(hu.shape),
            },
            sort_keys=True,
        ).encode()
    )
    return digest.hexdigest()


def default_ct_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The CT folder a --ct-dir defaults to: the 28-slice head CT in the data root (`data_root`)."""
    from fedge.data.medmnist import data_root

    root = data_root(data_dir)
    return None if root is None else root / "ct" / "ge_head_human_28slice"


def resolve_ct_dir(ct_dir: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """--ct-dir, else the data root's head CT: one rule and one error for the agent, the server and the demo."""
    folder = ct_dir or default_ct_dir(data_dir)
    if folder is None:
        raise UsageError(
            "the ldct task needs --ct-dir (ct_dir in an agent's YAML): a folder of CT DICOM series, or FEDGE_DATA_DIR holding ct/ge_head_human_28slice"
        )
    return Path(folder)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDGE_CACHE_DIR") or Path.home() / ".cache" / "fedge") / "ldct"


def simulate(
    hu: np.ndarray,
    pixel_mm: float,
    protocol: ScanProtocol,
    config: SimulationConfig = SimulationConfig(),
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> SlicePairs:
    """Pairs for every slice of `hu` (n, H, W): from the cache when the same source and protocol were
    simulated before, else simulated and written there (atomically, so concurrent agents are safe)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{cache_key(hu, pixel_mm, protocol, config, seed)[:32]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return SlicePairs(npz["low"], npz["normal"], protocol, float(npz["pixel_mm"]))
        except (OSError, ValueError, KeyError):
            pass  # a torn or foreign file: simulate again and replace it
    rng = np.random.default_rng([seed, int(protocol.i0), protocol.views])
    low, normal, new_mm = [], [], pixel_mm
    for image in hu:
        small, new_mm = resample(image, pixel_mm, config.image_size)
        low.append(scan(small, new_mm, protocol, rng, config.mu_water))
        normal.append(scan(small, new_mm, config.reference, rng, config.mu_water))
    pairs = SlicePairs(np.stack(low), np.stack(normal), protocol, new_mm)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, low=pairs.low, normal=pairs.normal, pixel_mm=np.float64(new_mm))
    os.replace(tmp, path)
    return pairs


def body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Tissue and everything it encloses (sinuses, ventricles): where the metrics are measured."""
    from scipy.ndimage import binary_fill_holes, binary_opening

    out = np.empty(hu.shape, dtype=bool)
    for i, image in enumerate(hu.reshape(-1, *hu.shape[-2:])):
        out.reshape(-1, *hu.shape[-2:])[i] = binary_fill_holes(binary_opening(image > threshold, iterations=2))
    return out


def patches(low: np.ndarray, normal: np.ndarray, size: int, stride: int, min_body: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Grid patches (size x size, every `stride` pixels) whose body fraction is at least `min_body`."""
    mask = body_mask(normal)
    lo, no = [], []
    n, h, w = low.shape
    for i in range(n):
        for y in range(0, h - size + 1, stride):
            for x in range(0, w - size + 1, stride):
                if mask[i, y : y + size, x : x + size].mean() >= min_body:
                    lo.append(low[i, y : y + size, x : x + size])
                    no.append(normal[i, y : y + size, x : x + size])
    if not lo:
        raise UsageError("no patch holds enough body; the CT slices look empty (check --ct-dir) or lower the patch size")
    return np.stack(lo), np.stack(no)
