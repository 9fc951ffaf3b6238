"""Experiment tracking: each round's numbers and the final model go to MLflow (`--mlflow URI`) or to
TensorBoard event files (`--tensorboard DIR`).

Both backends are optional (`pip install 'fedge[tracking]'`): `is_available()` says whether one can
run, and its library is imported only when it is used. `tracking(server, trackers)` wraps the
server's `on_round` callback; nothing in the round loop changes.
"""

from __future__ import annotations

import importlib.util
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedge.errors import UsageError

if TYPE_CHECKING:
    from server.rounds import RoundServer

INSTALL_HINT = "pip install 'fedge[tracking]'"


def round_numbers(record: dict[str, Any]) -> dict[str, float]:
    """A round record's numeric fields (AUC, accuracy, bytes, seconds, rejected; not the round itself)."""
    return {k: float(v) for k, v in record.items() if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_params(server: RoundServer) -> dict[str, str]:
    """What defines this federation run: logged once, as parameters."""
    config = server.config
    train = config.train
    return {
        "federation": config.federation, "fedge_run": server.run_id, "rounds": str(config.rounds),
        "min_clients": str(config.min_clients), "strategy": config.strategy, "uplink_codec": config.uplink_codec,
        "downlink_codec": config.downlink_codec or "full", "mode": train.mode, "epochs": str(train.epochs), "lr": str(train.lr),
        "batch_size": str(train.batch_size), "arch": server.model_config.arch, "seed": str(config.seed),
        "dataset": config.dataset or "",
    }  # fmt: skip


class Tracker(ABC):
    """One tracking backend: `start` once, `log_round` after each round, `finish` with the final model."""

    name: ClassVar[str]
    module: ClassVar[str]  # the library it needs

    @classmethod
    @cache
    def is_available(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    @classmethod
    def check(cls) -> None:
        if not cls.is_available():
            raise UsageError(f"--{cls.name} needs the {cls.module} package: {INSTALL_HINT}")

    @abstractmethod
    def start(self, params: dict[str, str]) -> None: ...

    @abstractmethod
    def log_round(self, step: int, numbers: dict[str, float]) -> None: ...

    @abstractmethod
    def finish(self, final_model: Path | None, ok: bool) -> None: ...


class MlflowTracker(Tracker):
    """An MLflow run per federation run, in the experiment named after the federation. `uri` is a
    tracking server URL (http://...), a database URI (sqlite:///mlflow.db, with the full mlflow
    package) or a folder: MLflow's own file store, e.g. `mlruns` (`mlflow ui --backend-store-uri mlruns`)."""

    name = "mlflow"
    module = "mlflow"

    def __init__(self, uri: str, experiment: str):
        self.uri = uri if "://" in uri or uri.startswith("file:") else Path(uri).absolute().as_uri()
        self.experiment = experiment
        self.client: Any = None
        self.run_id: str | None = None

    @property
    def file_store(self) -> bool:
        return self.uri.startswith("file:")

    def start(self, params: dict[str, str]) -> None:
        self.check()
        if self.file_store:
            # MLflow 3 keeps its file store only behind this opt-in (the database backend needs the full
            # mlflow package); a folder given here is that opt-in, unless the environment says otherwise.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        run = self.client.create_run(experiment_id, run_name=params.get("fedge_run", "")[:12], tags={"fedge.run": params.get("fedge_run", "")})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_round(self, step: int, numbers: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])

    def finish(self, final_model: Path | None, ok: bool) -> None:
        if self.client is None or self.run_id is None:
            return
        if final_model is not None and final_model.exists():
            self.client.log_artifact(self.run_id, str(final_model), artifact_path="model")
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class TensorBoardTracker(Tracker):
    """Scalars `round/<name>` per round in TensorBoard event files under `logdir/<fedge run>`; the
    final model's path as text (TensorBoard keeps no artifacts)."""

    name = "tensorboard"
    module = "tensorboardX"

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
        self.writer: Any = None

    def start(self, params: dict[str, str]) -> None:
        self.check()
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(self.logdir / params.get("fedge_run", "run")), flush_secs=5)
        self.writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def log_round(self, step: int, numbers: dict[str, float]) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(f"round/{key}", value, step)

    def finish(self, final_model: Path | None, ok: bool) -> None:
        if self.writer is None:
            return
        if final_model is not None and final_model.exists():
            self.writer.add_text("final_model", str(final_model.resolve()), 0)
        self.writer.close()


@contextmanager
def tracking(server: RoundServer, trackers: Sequence[Tracker]) -> Iterator[None]:
    """Log every round `server` completes inside the block, and the final model when it ends."""
    for tracker in trackers:
        tracker.check()  # before any run starts: a missing package is a usage error
    for tracker in trackers:
        tracker.start(run_params(server))
    previous = server.on_round

    def on_round(record: dict[str, Any]) -> None:
        for tracker in trackers:
            tracker.log_round(int(record["round"]), round_numbers(record))
        if previous is not None:
            previous(record)

    server.on_round = on_round
    ok = False
    try:
        yield
        ok = True
    finally:
        final = server.store.final_path if ok else None
        for tracker in trackers:
            tracker.finish(final, ok)
