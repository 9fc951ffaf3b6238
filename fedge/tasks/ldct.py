"""Low-dose CT denoising: a site's simulated (low-dose, normal-dose) pairs and the local step that
teaches a denoiser LD -> ND, scored by PSNR and SSIM in HU over the body mask.

Training uses patches (cheap on a CPU console); evaluation uses whole slices (the denoiser is fully
convolutional). Every sample carries its protocol's conditioning vector, so pooling sites for the
centralized bound is concatenation, and a FiLM-conditioned model sees each sample's own protocol.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from fedge.controlvariates import VariateStep
from fedge.data.ldct import ScanProtocol, SimulationConfig, body_mask, patches, simulate
from fedge.errors import UsageError
from fedge.models import ModelConfig
from fedge.tasks.classification import TrainResult
from fedge.tasks.optimizer import local_optimizer

if TYPE_CHECKING:
    from fedge.tasks.dp import DPSettings

HU_SCALE = 1000.0  # network input/output: HU / 1000 (water 0, air -1)
DATA_RANGE = 2000.0  # HU: the peak of PSNR and the dynamic range of SSIM
COND = 2  # conditioning planes: (log dose, views), `ScanProtocol.condition()`
NO_DP = "DP-SGD is not available for the ldct task; leave out --dp-noise-multiplier"
NO_AUGMENT = "augmentation is for classification (a denoiser's pairs would need the same transform): leave out --augment with --task ldct"
NO_LOGIT_ADJUST = "logit adjustment corrects a classifier's label skew; a denoiser has no labels: leave out --logit-adjust with --task ldct"


@dataclass(frozen=True)
class PairSet:
    """Low-dose input, normal-dose reference (HU) and each sample's protocol condition."""

    low: np.ndarray  # (n, H, W) float32
    normal: np.ndarray  # (n, H, W) float32
    cond: np.ndarray  # (n, COND) float32

    def __post_init__(self) -> None:
        if self.low.shape != self.normal.shape or self.low.ndim != 3 or self.cond.shape != (len(self.low), COND):
            raise ValueError(f"PairSet: low {self.low.shape}, normal {self.normal.shape}, cond {self.cond.shape} do not match")

    @classmethod
    def concat(cls, sets: Sequence["PairSet"]) -> "PairSet":
        return cls(*(np.concatenate([getattr(s, k) for s in sets]) for k in ("low", "normal", "cond")))

    def __len__(self) -> int:
        return len(self.low)


class Series(Protocol):
    """A CT series in HU (`edge_client.ingest.ct.CtSeries` is one): what the simulation reads."""

    @property
    def hu(self) -> np.ndarray: ...  # (slices, rows, cols)

    @property
    def pixel_mm(self) -> float: ...


def site_slices(series: Sequence[Series], shard: int, num_shards: int, test_per_site: int = 2) -> list[tuple[int, int, bool]]:
    """Site `shard`'s slices, as (series index, slice index, held out for test): every num_shards-th
    slice of the folder (so each site spans the anatomy), `test_per_site` of them spread out as test."""
    if not 0 <= shard < num_shards:
        raise UsageError(f"shard {shard} must be in [0, {num_shards})")
    every = [(i, j) for i, s in enumerate(series) for j in range(len(s.hu))]
    mine = every[shard::num_shards]
    if len(mine) < test_per_site + 1:
        raise UsageError(
            f"site {shard} of {num_shards} gets {len(mine)} CT slices; it needs {test_per_site + 1} "
            f"({test_per_site} to test, one to train): use fewer sites or a --ct-dir with more slices"
        )
    test = {int(round(x)) for x in np.linspace(0, len(mine) - 1, test_per_site + 2)[1:-1]}
    return [(i, j, k in test) for k, (i, j) in enumerate(mine)]


def eval_pairs(series: Sequence[Series], protocol: ScanProtocol, sim: SimulationConfig, *, seed: int = 0, cache_dir=None) -> PairSet:
    """Every slice of `series` under `protocol`, whole: a test set (an unseen scanner, an unseen protocol)."""
    sets = []
    for s in series:
        pairs = simulate(s.hu, s.pixel_mm, protocol, sim, seed=seed, cache_dir=cache_dir)
        sets.append(PairSet(pairs.low, pairs.normal, _cond_of(protocol, len(pairs.low))))
    return PairSet.concat(sets)


def denoiser_config(image_size: int, arch: str = "redcnn", **options) -> ModelConfig:
    """The denoiser's config from the image size alone: a server builds it before (or without) its evaluation CT."""
    cond = int(options.get("cond", 0))
    return ModelConfig(arch=arch, in_channels=1 + cond, num_classes=1, image_size=image_size, options=options)


def _cond_of(protocol: ScanProtocol, n: int) -> np.ndarray:
    return np.tile(np.asarray(protocol.condition(), dtype=np.float32), (n, 1))


def model_inputs(low_hu: np.ndarray, cond: np.ndarray, cond_channels: int) -> torch.Tensor:
    """(n, H, W) HU -> (n, 1 + cond_channels, H, W): the image / 1000 and constant protocol planes."""
    x = torch.from_numpy(np.ascontiguousarray(low_hu, dtype=np.float32) / HU_SCALE).unsqueeze(1)
    if not cond_channels:
        return x
    planes = torch.from_numpy(np.ascontiguousarray(cond[:, :cond_channels], dtype=np.float32))[:, :, None, None]
    return torch.cat([x, planes.expand(-1, -1, *x.shape[2:])], dim=1)


def cond_channels(model: nn.Module) -> int:
    """How many protocol planes the model takes (0 unless it is a FiLM-conditioned denoiser; works
    through LoRA wrappers, which hold the network as a submodule)."""
    return max((int(getattr(m, "cond", 0)) for m in model.modules() if hasattr(m, "film")), default=0)


def denoise_metrics(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """Mean over slices of PSNR and SSIM in HU inside each reference slice's body mask (scikit-image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if not np.isfinite(output).all():
        raise ValueError("the denoiser outputs NaN or Inf: training diverged; lower --lr and restart from the last checkpoint")
    masks = body_mask(reference)
    psnr, ssim = [], []
    for ref, out, mask in zip(reference, output, masks):
        psnr.append(peak_signal_noise_ratio(ref[mask], out[mask], data_range=DATA_RANGE))
        _, smap = structural_similarity(ref, out, data_range=DATA_RANGE, full=True)
        ssim.append(float(smap[mask].mean()))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}


class LdctTask:
    """One site's (or the evaluator's) pairs: training patches and whole test slices."""

    name = "ldct"

    def __init__(self, train: PairSet, test: PairSet, image_size: int):
        self.train, self.test, self.image_size = train, test, image_size

    @classmethod
    def simulate(
        cls,
        hu: np.ndarray,
        pixel_mm: float,
        protocol: ScanProtocol,
        *,
        test_slices: Sequence[int],
        sim: SimulationConfig = SimulationConfig(),
        patch: int = 32,
        stride: int = 12,
        seed: int = 0,
        cache_dir=None,
    ) -> "LdctTask":
        """Simulate `protocol` on slices `hu` (n, H, W); `test_slices` are held out whole, the rest become patches."""
        pairs = simulate(hu, pixel_mm, protocol, sim, seed=seed, cache_dir=cache_dir)
        test = np.zeros(len(hu), dtype=bool)
        test[list(test_slices)] = True
        if test.all():
            raise UsageError(f"all {len(hu)} slices are test slices; the site needs at least one to train on")
        lo, no = patches(pairs.low[~test], pairs.normal[~test], patch, stride)
        return cls(
            PairSet(lo, no, _cond_of(protocol, len(lo))), PairSet(pairs.low[test], pairs.normal[test], _cond_of(protocol, int(test.sum()))), sim.image_size
        )

    @classmethod
    def for_site(
        cls,
        series: Sequence[Series],
        protocol: ScanProtocol,
        *,
        shard: int = 0,
        num_shards: int = 1,
        test_per_site: int = 2,
        sim: SimulationConfig = SimulationConfig(),
        patch: int = 32,
        stride: int = 12,
        seed: int = 0,
        cache_dir=None,
    ) -> "LdctTask":
        """Site `shard`'s share of a CT folder (`site_slices`) under the site's protocol."""
        chosen = site_slices(series, shard, num_shards, test_per_site)
        tasks = []
        for i, s in enumerate(series):
            rows = [(j, test) for k, j, test in chosen if k == i]
            if rows:
                hu = s.hu[[j for j, _ in rows]]
                test_idx = [n for n, (_, test) in enumerate(rows) if test]
                if len(test_idx) < len(rows):
                    tasks.append(
                        cls.simulate(hu, s.pixel_mm, protocol, test_slices=test_idx, sim=sim, patch=patch, stride=stride, seed=seed, cache_dir=cache_dir)
                    )
        return cls.pool(tasks)

    @classmethod
    def scoring(
        cls, series: Sequence[Series], protocols: Sequence[ScanProtocol], *, sim: SimulationConfig = SimulationConfig(), seed: int = 0, cache_dir=None
    ) -> "LdctTask":
        """Score-only: every slice of `series` under each protocol, whole, and nothing to train on; what
        `fedge server --task ldct` evaluates each global on (its own CT, which no site holds)."""
        if not protocols:
            raise UsageError("the ldct evaluation needs at least one scan protocol (--protocol I0:VIEWS[:NOISE])")
        test = PairSet.concat([eval_pairs(series, p, sim, seed=seed, cache_dir=cache_dir) for p in protocols])
        return cls(PairSet(test.low[:0], test.normal[:0], test.cond[:0]), test, sim.image_size)

    @classmethod
    def pool(cls, tasks: Sequence["LdctTask"]) -> "LdctTask":
        """Every site's data in one task: the centralized bound and the server's evaluator."""
        return cls(PairSet.concat([t.train for t in tasks]), PairSet.concat([t.test for t in tasks]), tasks[0].image_size)

    def model_config(self, arch: str = "redcnn", **options) -> ModelConfig:
        return denoiser_config(self.image_size, arch, **options)

    def train_local(
        self,
        model: nn.Module,
        indices: np.ndarray | None = None,
        *,
        epochs: int = 1,
        lr: float = 1e-3,
        batch_size: int = 16,
        seed: int = 0,
        weight_decay: float = 0.0,
        device: str = "cpu",
        dp: DPSettings | None = None,
        prox_mu: float = 0.0,
        augment: bool = False,
        logit_adjust: float = 0.0,
        correction: Mapping[str, np.ndarray] | None = None,
        optimizer: str = "adam",
    ) -> TrainResult:
        """Adam (or SGD, as announced) on MSE(denoised, normal-dose) over the training patches, in place (plus FedProx's
        mu/2 ||w - w_round||^2 when announced, and SCAFFOLD's gradient correction when given). `accuracy` is 0: a denoiser has none (the wire's train
        metrics keep the classification names)."""
        if dp is not None:
            raise UsageError(NO_DP)
        if augment:
            raise UsageError(NO_AUGMENT)
        if logit_adjust > 0:
            raise UsageError(NO_LOGIT_ADJUST)
        data = self.train
        if indices is not None:
            data = PairSet(data.low[indices], data.normal[indices], data.cond[indices])
        x = model_inputs(data.low, data.cond, cond_channels(model)).to(device)
        y = torch.from_numpy(data.normal / HU_SCALE).unsqueeze(1).to(device)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        step = local_optimizer(params, optimizer, lr=lr, weight_decay=weight_decay)
        anchor = [p.detach().clone() for p in params] if prox_mu > 0 else []
        variates = VariateStep(model, correction) if correction is not None else None
        generator = torch.Generator().manual_seed(seed)
        start, total, seen = time.perf_counter(), 0.0, 0
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size].to(device)
                if len(idx) < 2:
                    continue  # BatchNorm cannot train on one sample
                step.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                proximal = 0.5 * prox_mu * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, anchor)) if anchor else 0.0
                (loss + proximal).backward()
                if variates is not None:
                    variates.apply()
                step.step()
                total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        model.to("cpu").eval()
        return TrainResult(num_samples=len(x), loss=total / max(seen, 1), accuracy=0.0, seconds=time.perf_counter() - start,
                           mean_gradient=variates.mean_gradient() if variates is not None else None)  # fmt: skip

    @torch.no_grad()
    def denoise(self, model: nn.Module, low_hu: np.ndarray, cond: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """The model's output in HU for low-dose slices `low_hu` (n, H, W) under protocol conditions `cond`."""
        model.eval()
        x = model_inputs(low_hu, cond, cond_channels(model))
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])[:, 0].numpy() * HU_SCALE

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """PSNR/SSIM of the denoised test slices, and of the low-dose input (`psnr_in`, `ssim_in`)."""
        if split != "test" or len(self.test) == 0:
            raise UsageError(f"the ldct task scores whole slices of its 'test' split (here {len(self.test)} slices), not {split!r}")
        out = denoise_metrics(self.test.normal, self.denoise(model, self.test.low, self.test.cond))
        before = denoise_metrics(self.test.normal, self.test.low)
        return {**out, "psnr_in": before["psnr"], "ssim_in": before["ssim"]}
