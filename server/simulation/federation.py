"""An in-process federation: sites train with the task's own local step, encode with the real codec,
and the server side decodes, validates and aggregates with the real strategy classes; no MQTT.

What the benchmarks use to compare aggregation rules and privacy settings over hundreds of runs on
one CPU: everything that decides the numbers (training, codec, validation, strategy, the
non-finite guard) is the production code; only the transport is left out.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compression import CodecError, ErrorFeedback, UpdateCodec
from fedge import controlvariates as CV
from fedge import weights as W
from fedge.data import ImageSplits, dirichlet_split
from fedge.models import build_model
from fedge.protocol import TrainSettings
from fedge.protocol.messages import LocalOptimizer
from fedge.schedule import LrSchedule, check_schedule, scheduled_lr
from fedge.tasks import ClassificationTask
from fedge.tasks.base import Task
from fedge.tasks.calibration import DEFAULT_SHRINKAGE, calibrate_on_shards
from fedge.tasks.optimizer import check_optimizer
from server.simulation.attacks import Attack, AttackContext
from server.strategies import ClientUpdate, Strategy, announced_train
from server.validation import RejectedUpdate, check_update

Dense = dict[str, np.ndarray]
SiteTrainer = Callable[[Task, torch.nn.Module, str, np.ndarray | None, int], int]  # (task, model, site, indices, seed) -> samples


@dataclass(frozen=True)
class SimulationSettings:
    sites: int = 10
    rounds: int = 15
    alpha: float = 0.5  # Dirichlet label skew of the site split
    codec: str = "topk:0.02,ef|ternary|zstd"
    arch: str = "cnn"
    model_options: dict[str, Any] = field(default_factory=lambda: {"widths": (16, 32, 64)})
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    augment: bool = False  # random flips and shifts of each local batch (TrainSettings.augment)
    logit_adjust: float = 0.0  # tau of each site's logit-adjusted loss (TrainSettings.logit_adjust)
    optimizer: LocalOptimizer = "adam"  # the local step's (TrainSettings.optimizer)
    lr_schedule: LrSchedule = "constant"  # each round's lr (fedge.schedule), as the server's --lr-schedule
    seed: int = 0
    max_samples: int = 1_000_000  # the server's --max-samples
    max_update_norm: float = 1e4  # the server's --max-update-norm

    def __post_init__(self) -> None:
        if self.sites < 1 or self.rounds < 1 or self.epochs < 1:
            raise ValueError("sites, rounds and epochs must be at least 1")
        check_schedule(self.lr_schedule)
        check_optimizer(self.optimizer)
        UpdateCodec.from_spec(self.codec)


@dataclass(frozen=True)
class Adversary:
    attack: Attack
    count: int  # how many of the sites are malicious (chosen by the seed)


def site_seed(seed: int, site: str, rnd: int) -> int:
    """Distinct per site and round (the agent's rule), so runs differing only in strategy train alike until they diverge."""
    return zlib.crc32(f"{seed}/{site}/{rnd}".encode())


def flipped_task(task: ClassificationTask) -> ClassificationTask:
    """The same images with every train label y replaced by C-1-y (a label-flipping site's data)."""
    splits = task.splits
    labels = dict(splits.labels, train=(splits.num_classes - 1 - splits.labels["train"]).astype(splits.labels["train"].dtype))
    return ClassificationTask(ImageSplits(images=splits.images, labels=labels, name=splits.name))


def finite_aggregate(strategy: Strategy, updates: list[ClientUpdate], weights: Dense, manifest) -> tuple[Dense | None, list[str]]:
    """The server's guard (`RoundServer._aggregate`): while global + aggregate is not finite, leave
    out the largest-norm update and aggregate again. Returns (aggregate or None, left-out sites)."""
    left_out: list[str] = []
    pool = list(updates)
    while pool:
        with np.errstate(over="ignore", invalid="ignore"):
            mean = strategy.aggregate(pool, manifest)
            if all(np.isfinite(weights[k] + v).all() for k, v in mean.items()):
                return mean, left_out
        worst = max(pool, key=lambda u: u.norm)
        pool.remove(worst)
        left_out.append(worst.client)
    return None, left_out


class InProcessFederation:
    """One federation run. `local_noise` (client-level local DP) transforms each honest delta before
    the codec; `trainer` replaces the local step (record-level DP-SGD). `site_tasks` gives each site
    its own task (all of its data; e.g. one scan protocol per site) instead of a Dirichlet shard of `task`."""

    def __init__(
        self,
        settings: SimulationSettings,
        task: Task,
        strategy: Strategy,
        adversary: Adversary | None = None,
        *,
        trainer: SiteTrainer | None = None,
        local_noise: Callable[[Dense, np.random.Generator], Dense] | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        site_tasks: Mapping[str, Task] | None = None,
    ) -> None:
        self.site_tasks = dict(site_tasks or {})
        if self.site_tasks and (len(self.site_tasks) != settings.sites or adversary is not None):
            raise ValueError(f"site_tasks: give settings.sites ({settings.sites}) tasks, one per site, and no adversary")
        self.settings, self.task, self.strategy, self.adversary = settings, task, strategy, adversary
        # What the server would announce: FedProx's mu reaches the local step, FedBN keeps normalisation layers at the sites.
        self.train = announced_train(TrainSettings(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, augment=settings.augment,
                                                   logit_adjust=settings.logit_adjust, optimizer=settings.optimizer), strategy)  # fmt: skip
        if trainer is not None and self.train.control_variates:
            raise ValueError("a custom trainer cannot follow SCAFFOLD's correction: use the agent's step (trainer=None)")
        self.round_train = self.train  # what the open round announces (the scheduled lr)
        self.trainer = trainer or self._agent_step
        self.local_noise = local_noise
        self.on_round = on_round
        self.codec = UpdateCodec.from_spec(settings.codec)
        self.names = list(self.site_tasks) or [f"site-{i + 1}" for i in range(settings.sites)]
        self.shards: dict[str, np.ndarray | None] = (
            dict.fromkeys(self.names)
            if self.site_tasks
            else dict(zip(self.names, dirichlet_split(task.splits.labels["train"], settings.sites, settings.alpha, settings.seed)))  # type: ignore[attr-defined]
        )
        rng = np.random.default_rng(settings.seed)
        count = adversary.count if adversary else 0
        self.malicious = set(rng.permutation(self.names)[:count].tolist())
        self.flipped = flipped_task(task) if adversary and adversary.attack.flips_labels and isinstance(task, ClassificationTask) else None
        torch.manual_seed(settings.seed)
        self.model = build_model(task.model_config(settings.arch, **settings.model_options))
        initial = W.float_state(self.model)
        self.local = W.norm_layer_names(self.model) if self.train.local_norm else frozenset()
        self.weights = {k: v for k, v in initial.items() if k not in self.local}
        if self.train.control_variates:  # SCAFFOLD: c is part of the global, each site keeps its c_i
            self.weights |= CV.zero_variates(self.model, self.local)
        self.site_variates: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.names}
        self.mean_gradient: dict[str, np.ndarray] | None = None  # of the last local step, under control variates
        self.site_local = {name: {k: initial[k].copy() for k in self.local} for name in self.names}  # FedBN: each site's own
        self.manifest = UpdateCodec.manifest(self.weights)
        self.residuals = {name: ErrorFeedback() for name in self.names}

    def _agent_step(self, task: Task, model: torch.nn.Module, site: str, indices: np.ndarray | None, seed: int) -> int:
        """The agent's local step under the open round's announcement (the simulation's settings, the
        scheduled lr, and what the strategy adds: FedProx's mu)."""
        a = self.round_train
        correction = CV.correction(CV.split(self.weights)[1], self.site_variates[site], self.residuals[site]) if a.control_variates else None
        result = task.train_local(model, indices, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, seed=seed, prox_mu=a.prox_mu, augment=a.augment,
                                  logit_adjust=a.logit_adjust, correction=correction, optimizer=a.optimizer)  # fmt: skip
        self.mean_gradient = result.mean_gradient
        return result.num_samples

    def _train(self, task: Task, site: str, rnd: int) -> tuple[Dense, int]:
        weights = CV.split(self.weights)[0]
        W.load_float_state(self.model, weights | self.site_local[site])
        seed = site_seed(self.settings.seed, site, rnd)
        torch.manual_seed(seed)
        samples = self.trainer(task, self.model, site, self.shards[site], seed)
        trained = W.float_state(self.model)
        self.site_local[site] = {k: trained[k] for k in self.local}
        delta = W.subtract(trained, weights)  # the global's tensors only: local ones never travel
        if self.mean_gradient is not None:  # SCAFFOLD
            delta |= CV.update_entries(self.mean_gradient, self.site_variates[site])
            self.site_variates[site] = self.mean_gradient
        return delta, samples

    def _receive(self, site: str, delta: Dense, samples: int, seed: int, residual: ErrorFeedback | None) -> ClientUpdate:
        """Encode as the site would, then the server's decode and checks."""
        payload = self.codec.encode(delta, residual=residual, keep_dense=W.norm_stat_names(delta), seed=seed)
        if not 1 <= samples <= self.settings.max_samples:
            raise RejectedUpdate("sample-count", f"sample count {samples} outside [1, {self.settings.max_samples}]")
        decoded = self.codec.decode(payload, self.manifest)
        return ClientUpdate(site, samples, decoded, len(payload), check_update(decoded, self.settings.max_update_norm))

    def _samples(self, site: str) -> int:
        """The size of a site's Dirichlet shard (an adversary's sites always have one: __init__ refuses site_tasks with it)."""
        shard = self.shards[site]
        assert shard is not None, "site_tasks and an adversary are refused together"
        return len(shard)

    def round(self, rnd: int) -> dict[str, Any]:
        started = time.perf_counter()
        self.round_train = self.train.model_copy(update={"lr": scheduled_lr(self.train.lr, rnd, self.settings.rounds, self.settings.lr_schedule)})
        honest = {site: self._train(self.site_tasks.get(site, self.task), site, rnd) for site in self.names if site not in self.malicious}
        updates: list[ClientUpdate] = []
        rejected: list[str] = []
        noise_rng = np.random.default_rng([self.settings.seed, rnd, 1])
        for site, (delta, samples) in honest.items():
            sent = self.local_noise(delta, noise_rng) if self.local_noise else delta
            try:
                updates.append(self._receive(site, sent, samples, site_seed(self.settings.seed, site, rnd), self.residuals[site]))
            except CodecError:  # trained from a poisoned global, the step diverged: the agent's codec refuses to send it
                rejected.append(f"{site}: diverged")
            except RejectedUpdate as exc:
                rejected.append(f"{site}: {exc.kind}")
        if self.adversary:
            attack = self.adversary.attack
            rng = np.random.default_rng([self.settings.seed, rnd, 2])
            for site in sorted(self.malicious):
                own, samples = self._train(self.flipped or self.task, site, rnd) if attack.trains else (None, self._samples(site))
                ctx = AttackContext(own, [d for d, _ in honest.values()], samples, self.settings.max_samples, len(self.malicious), rng)
                forged, claimed = attack.forge(ctx)
                try:
                    updates.append(self._receive(site, forged, claimed, site_seed(self.settings.seed, site, rnd), None))
                except CodecError:
                    rejected.append(f"{site}: unencodable")
                except RejectedUpdate as exc:
                    rejected.append(f"{site}: {exc.kind}")
        train_seconds = time.perf_counter() - started
        start = time.perf_counter()
        mean, left_out = finite_aggregate(self.strategy, updates, self.weights, self.manifest)
        aggregate_seconds = time.perf_counter() - start
        if mean is not None:
            self.weights = W.add(self.weights, mean)
            self.strategy.commit()
        record = {
            "round": rnd,
            "updates": len(updates),
            "rejected": rejected,
            "left_out": left_out,
            "applied": mean is not None,
            "uplink_bytes": sum(u.nbytes for u in updates),
            "train_seconds": train_seconds,
            "aggregate_seconds": aggregate_seconds,
            **self.strategy.round_metrics(),
        }
        if self.on_round:
            self.on_round(record)
        return record

    def evaluate(self) -> tuple[dict[str, float], bool]:
        """Test metrics of the current global, and whether it is broken. Finite weights can still
        output NaN (an attack that drives a BatchNorm running_var negative): such a model ranks
        nothing, so it scores as chance (AUC 0.5, accuracy 0) and is flagged.

        With local layers (FedBN) there is no one global model: each site's model (the global plus
        its own normalisation layers) is scored on the test split, and the metrics are their mean."""
        if not self.local:
            return self._score(self.weights)
        scores = [self._score(self.weights | self.site_local[site]) for site in self.names]
        return {k: float(np.mean([m[k] for m, _ in scores])) for k in ("auc", "accuracy")}, any(b for _, b in scores)

    def calibrated(self, shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[dict[str, float], int]:
        """Test metrics of the global with its head refit by LDA from the sites' class-wise feature
        statistics (fedge.tasks.calibration), and the bytes one site's statistics take in float32.
        Each site computes them for the current global on its own shard; the server sums them."""
        task = self.task
        if self.local or self.site_tasks or self.adversary or not isinstance(task, ClassificationTask):
            raise ValueError("head calibration needs one global model (not fedbn), no adversary and Dirichlet shards of a classification task")
        W.load_float_state(self.model, CV.split(self.weights)[0])
        total = calibrate_on_shards(self.model, task.splits, list(self.shards.values()), shrinkage)
        return task.evaluate(self.model), 4 * total.wire_floats

    def _score(self, weights: Dense) -> tuple[dict[str, float], bool]:
        W.load_float_state(self.model, CV.split(weights)[0])
        try:
            return self.task.evaluate(self.model), False
        except ValueError:
            return {"auc": 0.5, "accuracy": 0.0}, True

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        history = [self.round(rnd) for rnd in range(1, self.settings.rounds + 1)]
        seconds = time.perf_counter() - started
        finite = all(np.isfinite(v).all() for v in self.weights.values())
        metrics, broken = self.evaluate()
        return {
            "final_auc": metrics["auc"],
            "final_accuracy": metrics["accuracy"],
            "finite": finite,
            "outputs_nan": broken,
            "seconds_per_round": seconds / self.settings.rounds,
            "aggregate_seconds_per_round": float(np.mean([r["aggregate_seconds"] for r in history])),
            "malicious": sorted(self.malicious),
            "history": history,
        }
