"""Training modes: how a site adapts the shared model, and which tensors travel each round.

One class per mode, registered by name (`full`, `lora`, `pruned`, `qat`), each a frozen dataclass
of its options. The agent, the server and the demo all go through the same four calls:

    mode = get_mode("lora", r=4)
    model = mode.prepare(build_model(config), config)   # wrap/mutate for training
    state = mode.trainable_state(model)                  # what travels (names -> tensors)
    mode.load_trainable(model, state)                    # what arrives
    plain = mode.export_model(model)                     # the final checkpoint, built from mode.final_config(config)

`pruned` adds the server-side `prune`, whose returned config rebuilds the same architecture on
every agent through `build_model`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import psutil
import torch
from torch import nn

from compression import lora, pruning, qat
from fedge.errors import UsageError
from fedge.models import ModelConfig, build_model
from fedge.protocol.messages import MODE_NAMES
from fedge.registry import Registry

MODES: Registry[type[TrainingMode]] = Registry("training mode")


def register_mode(name: str) -> Callable[[type[TrainingMode]], type[TrainingMode]]:
    """Register a mode under a name the wire protocol knows (`fedge.protocol.messages.ModeName`)."""
    if name not in MODE_NAMES:
        raise ValueError(f"training mode {name!r} is not in fedge.protocol.messages.ModeName {MODE_NAMES}; add it there first")

    def wrap(cls: type[TrainingMode]) -> type[TrainingMode]:
        cls.name = name
        return MODES.register(name)(cls)

    return wrap


def get_mode(name: str, **options: object) -> TrainingMode:
    """The mode `name` with its options validated (unknown options name the known ones)."""
    cls = MODES.get(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"mode {name!r} has no options {unknown}; known: {sorted(known) or 'none'}")
    return cls(**options)  # type: ignore[arg-type]


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}


@dataclass(frozen=True)
class TrainingMode:
    """Base: dense training where every float parameter and buffer travels."""

    name: ClassVar[str]

    def global_model(self, model: nn.Module, config: ModelConfig) -> tuple[nn.Module, ModelConfig, pruning.PruneStats | None]:
        """The server's plain global model in this mode, before `prepare`; (model, config, what pruning did)."""
        return model, config, None

    def prepare(self, model: nn.Module, config: ModelConfig) -> nn.Module:
        return model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return _float_state(model)

    def load_trainable(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` into `model`; names and shapes must match `trainable_state(model)` exactly."""
        own = self.trainable_state(model)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != tuple(state[k].shape))
        if missing or unexpected or wrong:
            raise ValueError(
                f"{self.name} state does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"wrong shapes {wrong[:3]}. Agent and server must run the same --mode on the same model config."
            )
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(torch.as_tensor(v))

    def export_model(self, model: nn.Module) -> nn.Module:
        return model.eval()

    def final_config(self, config: ModelConfig) -> ModelConfig:
        """The config `build_model` rebuilds `export_model`'s result from (the final checkpoint's)."""
        return config

    def trainable_params(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


@register_mode("full")
@dataclass(frozen=True)
class FullMode(TrainingMode):
    """Dense fine-tuning: the baseline every other mode is measured against."""


@register_mode("lora")
@dataclass(frozen=True)
class LoraMode(TrainingMode):
    """peft LoRA on a frozen backbone; only adapters, the head (and norm statistics) travel.

    `targets=None` adapts every Linear/Conv2d except the head; `train_norms` and `freeze_a` are
    explained at `compression.lora.add_adapters`.
    """

    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    head: str = "head"
    train_norms: bool = False
    freeze_a: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora option 'r' must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora option 'dropout' must be in [0, 1), got {self.dropout}")
        if self.targets is not None:  # a JSON list from the round announcement: keep the mode hashable
            object.__setattr__(self, "targets", tuple(self.targets))

    def prepare(self, model: nn.Module, config: ModelConfig) -> nn.Module:
        return lora.add_adapters(
            model, self.r, self.alpha, self.targets, self.dropout, trainable=(self.head,),
            train_norms=self.train_norms, freeze_a=self.freeze_a,
        )  # fmt: skip

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # A frozen backbone still updates BatchNorm statistics in train mode: they travel too, so
        # the server evaluates what the sites trained. (A ViT has none.)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        stats = {n for n, b in model.named_buffers() if b.is_floating_point()}
        return {k: v for k, v in _float_state(model).items() if k in trained or k in stats}

    def export_model(self, model: nn.Module) -> nn.Module:
        return lora.merge_adapters(model).eval()  # type: ignore[arg-type]


@dataclass(frozen=True)
class PruneResult:
    """The server's pruned model, the config every agent rebuilds it from, and the size change."""

    model: nn.Module
    config: ModelConfig
    stats: pruning.PruneStats


@register_mode("pruned")
@dataclass(frozen=True)
class PrunedMode(TrainingMode):
    """Dense training of a server-pruned (structurally narrower) model.

    The server calls `prune` before round 1 (or again between rounds); the config it returns
    carries `options["pruned"]` (tensor name -> shape), which `build_model` replays on each agent.
    """

    ratio: float = 0.5
    round_to: int | None = None
    head: str = "head"

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"pruned option 'ratio' must be in (0, 1), got {self.ratio}")

    def prepare(self, model: nn.Module, config: ModelConfig) -> nn.Module:
        if "pruned" not in config.options:
            raise ValueError(
                "pruned mode needs the server's pruned architecture: call PrunedMode.prune(model, config) on the server "
                "and build every agent's model from the config it returns"
            )
        return model

    def global_model(self, model: nn.Module, config: ModelConfig) -> tuple[nn.Module, ModelConfig, pruning.PruneStats | None]:
        """Pruned once: a config that already carries `options["pruned"]` is the pruned model."""
        if "pruned" in config.options:
            return model, config, None
        result = self.prune(model, config)
        return result.model, result.config, result.stats

    def prune(self, model: nn.Module, config: ModelConfig) -> PruneResult:
        """Prune `model` (built from `config`, pruned or not) in place by `ratio` of its channels."""
        head = model.get_submodule(self.head)
        example = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
        stats = pruning.prune_channels(model, example, self.ratio, ignored_layers=[head], round_to=self.round_to)
        base = config.replace(options={k: v for k, v in config.options.items() if k != "pruned"})
        shapes = pruning.changed_shapes(model, build_model(base))
        return PruneResult(model, base.replace(options={**base.options, "pruned": shapes}), stats)


@register_mode("qat")
@dataclass(frozen=True)
class QatMode(TrainingMode):
    """Int8 fake-quantized training; the exported model keeps the fake-quant ops (ONNX QDQ).

    Observed input ranges (`*.input_amax` buffers) travel and are averaged with the weights.
    """

    momentum: float = 0.9

    def prepare(self, model: nn.Module, config: ModelConfig) -> nn.Module:
        return qat.quantize_layers(model, self.momentum)

    def final_config(self, config: ModelConfig) -> ModelConfig:
        """The exported model keeps its fake-quant layers: `build_model` replays them from `options["qat"]`."""
        return config.replace(options={**config.options, "qat": {"momentum": self.momentum}})

    def export_model(self, model: nn.Module) -> nn.Module:
        unobserved = qat.unobserved_layers(model)
        if unobserved:
            raise ValueError(
                f"QAT layers {unobserved[:3]} never saw data, so their int8 ranges are unknown; "
                "train at least one step or run compression.qat.calibrate(model, batches) before export"
            )
        return model.eval()


@dataclass(frozen=True)
class StepFootprint:
    """Cost of one local training step: the process's peak memory during it, and wall time.

    Peaks are absolute (RSS on CPU, allocated on CUDA): freed memory stays in the allocator's pools,
    so a before/after difference undercounts. Compare modes in fresh processes on the same data.
    """

    peak_mem_mb: float
    step_seconds: float


def measure_step(step: Callable[[], object], repeats: int = 3, device: str = "cpu") -> StepFootprint:
    """Run `step` 1 + `repeats` times; the peak covers all runs (optimizer state is allocated on the
    first), the time averages the repeats. CPU: RSS sampled every millisecond; CUDA: max allocated."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        return StepFootprint(torch.cuda.max_memory_allocated(device) / 2**20, seconds)

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        seconds = (time.perf_counter() - start) / repeats
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return StepFootprint(peak[0] / 2**20, seconds)
