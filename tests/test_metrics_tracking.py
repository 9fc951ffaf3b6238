"""Experiment tracking: a 2-round federation logs each round's numbers and the final model to
TensorBoard event files and to MLflow's file store, read back with each tool's own format."""

from __future__ import annotations

import struct
import threading
from functools import partial
from pathlib import Path

import pytest

from edge_client.agent import Agent
from edge_client.config import AgentConfig
from fedge.data import dirichlet_split, load_medmnist
from fedge.errors import UsageError
from fedge.memory_transport import MemoryBroker
from fedge.models import ModelConfig
from fedge.tasks import ClassificationTask
from server.config import ServerConfig
from server.rounds import RoundServer
from server.tracking import MlflowTracker, TensorBoardTracker, Tracker, round_numbers, tracking

FED = "tracked"
SITES = ("site-1", "site-2")
MODEL = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [4, 8]})


def run_tracked(root: Path, data: Path, trackers: list[Tracker]) -> RoundServer:
    task = ClassificationTask(load_medmnist("breastmnist", data))
    broker = MemoryBroker()
    config = ServerConfig(federation=FED, broker="memory://", model=MODEL, checkpoint_dir=root / "ckpt", rounds=2, min_clients=2,
                          expected_clients=SITES, round_timeout=60, wait_for_clients=60)  # fmt: skip
    server = RoundServer(config, evaluator=task.evaluate)
    shards = dirichlet_split(task.splits.labels["train"], 2, 1.0, 0)
    agents = [threading.Thread(target=partial(Agent(AgentConfig(broker="mqtt://unused:1", site=site, federation=FED, state_dir=root / site),
                                                    task, shards[i][:64]).run, transport=broker.session), daemon=True)
              for i, site in enumerate(SITES)]  # fmt: skip
    for agent in agents:
        agent.start()
    with tracking(server, trackers):
        server.run(transport=broker.session)
    for agent in agents:
        agent.join(60)
    return server


def tfrecords(path: Path) -> list[bytes]:
    """The records of a TFRecord file (what TensorBoard reads): length, its CRC, data, its CRC."""
    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        records.append(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
    return records


@pytest.mark.skipif(not TensorBoardTracker.is_available(), reason="tensorboardX is not installed (pip install 'fedge[tracking]')")
def test_tensorboard_event_files_hold_every_rounds_numbers(medmnist_root, tmp_path) -> None:
    from tensorboardX.proto.event_pb2 import Event

    server = run_tracked(tmp_path, medmnist_root, [TensorBoardTracker(tmp_path / "tb")])
    files = list((tmp_path / "tb" / server.run_id).glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars: dict[str, dict[int, float]] = {}
    texts = []
    for raw in tfrecords(files[0]):
        event = Event.FromString(raw)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
            elif value.HasField("tensor"):
                texts.append((value.tag, b"".join(value.tensor.string_val).decode()))
    for record in server.state.history:
        for key, number in round_numbers(record).items():
            assert scalars[f"round/{key}"][record["round"]] == pytest.approx(number, rel=1e-6)
    assert set(scalars) >= {"round/auc", "round/accuracy", "round/uplink_bytes", "round/downlink_bytes", "round/seconds"}
    assert any(tag.startswith("final_model") and text.endswith("final.safetensors") for tag, text in texts), texts


@pytest.mark.skipif(not MlflowTracker.is_available(), reason="mlflow is not installed (pip install 'fedge[tracking]')")
def test_mlflow_file_store_holds_every_rounds_numbers_params_and_the_final_model(medmnist_root, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    tracker = MlflowTracker(str(tmp_path / "mlruns"), experiment=FED)
    server = run_tracked(tmp_path, medmnist_root, [tracker])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").absolute().as_uri())
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["fedge_run"] == server.run_id and run.data.params["rounds"] == "2"
    for key in ("auc", "accuracy", "uplink_bytes"):
        logged = {m.step: m.value for m in client.get_metric_history(tracker.run_id, key)}
        assert logged == {r["round"]: pytest.approx(float(r[key])) for r in server.state.history}, key
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/final.safetensors"]


def test_a_missing_tracking_package_is_named_before_the_federation_starts(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(MlflowTracker, "is_available", classmethod(lambda cls: False))
    with pytest.raises(UsageError, match=r"--mlflow needs the mlflow package: pip install 'fedge\[tracking\]'"):
        MlflowTracker(str(tmp_path), experiment=FED).check()
