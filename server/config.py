"""Server settings: one frozen object, built by the CLI or the demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedge.errors import UsageError
from fedge.models import ModelConfig
from fedge.protocol import TrainSettings
from fedge.protocol.chunks import DEFAULT_CHUNK_SIZE
from fedge.rounds import codec_for
from fedge.schedule import LrSchedule, check_schedule
from fedge.tasks.calibration import DEFAULT_SHRINKAGE
from server.strategies import STRATEGIES, announced_train, get_strategy


@dataclass(frozen=True)
class ServerConfig:
    federation: str
    broker: str
    model: ModelConfig
    checkpoint_dir: Path
    rounds: int = 10
    min_clients: int = 2
    expected_clients: tuple[str, ...] = ()  # if set, wait for all of them, not just min_clients
    round_timeout: float = 300.0
    uplink_codec: str = "fp32"
    downlink_codec: str | None = None  # None: full model each round; else a delta codec spec
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)  # checked here against the strategy's options
    train: TrainSettings = field(default_factory=TrainSettings)  # announced to the sites each round (mode included)
    lr_schedule: LrSchedule = "constant"  # fedge.schedule: each round's announced lr, from train.lr over `rounds`
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    client_id: str = "server"
    trusted_keys: Path | None = None  # folder of <client>.pub; when set, unsigned updates and status are refused
    signing_key: Path | None = None
    # Broker TLS (mutual, with `fedge provision` files); the client id is then the certificate identity.
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    wait_for_clients: float = 600.0
    dataset: str | None = None  # recorded in checkpoints so `fedge export`/`bench` find the test data
    init_checkpoint: Path | None = None  # pretrained start; else a seeded fresh model
    # Update sanity: a site's sample count (its FedAvg weight) and the L2 norm of its decoded delta.
    max_samples: int = 1_000_000
    site_max_samples: dict[str, int] = field(default_factory=dict)  # registered at provisioning: tighter per site
    max_update_norm: float = 1e4
    max_queue_bytes: int = 256 << 20  # inbound messages waiting to be handled; beyond, dropped and counted
    decode_workers: int = 0  # processes that decode and check updates (server.intake); 0: in the round loop
    # Asynchronous rounds (server.fedbuff): an aggregate every `buffer` accepted updates, each trained
    # from one of the last `max_staleness` + 1 versions and weighted by its staleness.
    rounds_mode: Literal["sync", "async"] = "sync"
    buffer: int = 2
    max_staleness: int = 4
    # After the last round, one head-calibration round (fedge.tasks.calibration): the sites' feature
    # statistics refit the final model's linear head as LDA, shrunk by `head_shrinkage`.
    calibrate_head: bool = False
    head_shrinkage: float = DEFAULT_SHRINKAGE

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_clients < 1:
            raise ValueError("rounds and min_clients must be at least 1")
        if not (self.max_samples >= 1 and self.max_update_norm > 0):
            raise ValueError("max_samples must be >= 1 and max_update_norm > 0")
        if self.decode_workers < 0:
            raise ValueError(f"decode_workers must be >= 0 (0: decode in the round loop), got {self.decode_workers}")
        if self.rounds_mode not in ("sync", "async") or self.buffer < 1 or not 0 <= self.max_staleness <= 1000:
            raise ValueError(f"rounds_mode sync|async, buffer >= 1 and max_staleness in [0, 1000], got {self.rounds_mode!r}, "
                             f"{self.buffer}, {self.max_staleness}")  # fmt: skip
        check_schedule(self.lr_schedule)
        if self.round_timeout <= 0 or self.chunk_size < 1024:
            raise ValueError("round_timeout must be positive and chunk_size at least 1024 bytes")
        # A wrong name or option, or a strategy the training settings exclude, fails before anything starts.
        check_strategy(self.train, self.strategy, self.strategy_options, self.rounds_mode, self.uplink_codec)
        if self.calibrate_head:
            check_calibration(self.strategy, self.rounds_mode, dp_sgd=self.train.dp_noise_multiplier is not None, shrinkage=self.head_shrinkage)


def check_calibration(strategy: str, rounds_mode: str, *, dp_sgd: bool, shrinkage: float = DEFAULT_SHRINKAGE) -> None:
    """UsageError for a head-calibration round the federation cannot run (the model's head is checked by the server)."""
    refusal = STRATEGIES.get(strategy).calibration_refusal
    if refusal:
        raise UsageError(f"--calibrate-head with strategy {strategy!r}: {refusal}; use fedavg, fedprox, fedadam, fedyogi or scaffold")
    if dp_sgd:
        raise UsageError("--calibrate-head with DP-SGD: the sites' class feature sums would travel without noise; leave out one of them")
    if rounds_mode != "sync":
        raise UsageError("--calibrate-head needs synchronous rounds: every site's statistics of the one final model; use --rounds-mode sync")
    if not 0.0 <= shrinkage <= 1.0:
        raise UsageError(f"head_shrinkage must be in [0, 1], got {shrinkage}")


def check_strategy(train: TrainSettings, strategy: str, options: dict[str, Any], rounds_mode: str, uplink_codec: str) -> TrainSettings:
    """What the server will announce under `strategy`; UsageError for a name, option or combination it cannot run."""
    announced = announced_train(train, get_strategy(strategy, **options))
    if announced.control_variates and rounds_mode == "async":
        raise UsageError(f"strategy {strategy!r} (control variates) needs synchronous rounds: a stale site's variate "
                         "would correct against a server variate it never saw; use --rounds-mode sync")  # fmt: skip
    codec = codec_for(uplink_codec)
    if announced.control_variates and not (codec.is_lossless or codec.uses_error_feedback):
        raise UsageError(f"strategy {strategy!r} with the lossy uplink codec {uplink_codec!r}: add 'ef' (e.g. 'topk:0.02,ef|ternary|zstd'), "
                         "or the server's control variate drifts from the sites' by what the codec drops")  # fmt: skip
    return announced
