"""Agent settings, loadable from the YAML file that `fedge agent init` writes."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedge.protocol.chunks import DEFAULT_CHUNK_SIZE
from fedge.protocol.envelope import NAME_PATTERN
from fedge.protocol.messages import ModeName
from fedge.tasks.base import TaskName


class AgentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    broker: str
    site: str = Field(pattern=NAME_PATTERN)
    federation: str = Field(default="demo", pattern=NAME_PATTERN)
    dataset: str = "pneumoniamnist"
    data_dir: Path | None = None
    # The task this site trains (fedge.tasks.base.TaskName); ldct reads CT series from ct_dir and
    # simulates the site's scan protocol (I0:VIEWS[:ELECTRONIC_NOISE], fedge.data.ldct.ScanProtocol).
    task: TaskName = "classification"
    ct_dir: Path | None = None
    protocol: str | None = None
    image_size: int | None = Field(default=None, ge=16, le=1024)  # ldct: resample slices to this size (default: SimulationConfig's)
    shard: int | None = Field(default=None, ge=0)  # simulation: this site's Dirichlet shard of a public dataset
    num_shards: int | None = Field(default=None, ge=1)
    alpha: float = Field(default=0.5, gt=0)
    state_dir: Path = Path("agent-state")
    codec: str | None = None  # if set, refuse rounds that announce another uplink codec
    mode: ModeName | None = None  # if set, refuse rounds in another training mode
    # Answer a head-calibration round with this site's class counts, class feature sums and feature Gram
    # matrix (fedge.tasks.calibration): more about its data than a model delta says. False: refuse it.
    head_stats: bool = True
    seed: int = 0
    threads: int = Field(default=1, ge=1)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: CUDA when present
    signing_key: Path | None = None
    server_key: Path | None = None
    # Broker TLS (mutual, with the files of a `fedge provision site` kit); the client id is then the certificate identity.
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024)
    uplink_mbps: float | None = Field(default=None, gt=0)  # link emulation (profile's link) when set
    downlink_mbps: float | None = Field(default=None, gt=0)
    # A global whose model config builds a larger model (float32 state) is refused before it is built.
    max_model_mb: int = Field(default=2048, ge=1)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AgentConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
            config = cls.model_validate(data)
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read agent config {path}: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"agent config {path} is invalid: {problems}") from None
        return config.relative_to(Path(path).absolute().parent)

    def relative_to(self, folder: Path) -> "AgentConfig":
        """Relative paths in a YAML file mean "beside this file", so a site kit can be copied anywhere."""
        update = {}
        for name in ("data_dir", "ct_dir", "state_dir", "signing_key", "server_key", "ca", "cert", "key"):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                update[name] = folder / value
        return self.model_copy(update=update)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)
