"""Checkpoints describe themselves in every training mode: the server's round checkpoints (training
form) and final checkpoint (plain) both build the plain model, and `fedge export` takes either."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from fedge.checkpoint import SCHEMA_VERSION, load_checkpoint, save_checkpoint
from fedge.errors import NotFoundError, SchemaVersionError
from fedge.models import ModelConfig, build_model
from fedge.modes import MODES, TrainingMode, get_mode
from fedge.weights import float_state
from server.store import CheckpointStore, RoundState

CONFIG = ModelConfig("cnn", 1, 2, 28, {"widths": [4, 8]})
# Non-default options, so a checkpoint that forgot them would not rebuild.
OPTIONS: dict[str, dict[str, object]] = {"lora": {"r": 2, "alpha": 4.0}, "pruned": {"ratio": 0.5}, "qat": {"momentum": 0.8}}


def _global(mode: TrainingMode) -> tuple[nn.Module, ModelConfig]:
    """The server's training-time global after a few local steps (QAT observers need to see data)."""
    torch.manual_seed(0)
    model, config, _ = mode.global_model(build_model(CONFIG), CONFIG)
    model = mode.prepare(model, config)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 2, (8,), generator=gen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), config


def _store_round_and_final(name: str, folder, dataset: str = "pneumoniamnist") -> tuple[CheckpointStore, torch.Tensor, torch.Tensor]:
    mode = get_mode(name, **OPTIONS.get(name, {}))
    model, config = _global(mode)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    store = CheckpointStore(folder, config, model, mode, dataset)
    store.save(RoundState(2, float_state(model)), "fed")
    store.save_final(mode.export_model(model), mode.final_config(config), 2, "fed")
    return store, x, expected


@pytest.mark.parametrize("name", MODES.names())
def test_round_and_final_checkpoints_of_every_mode_build_the_same_plain_model(name: str, tmp_path) -> None:
    store, x, expected = _store_round_and_final(name, tmp_path)

    round_ckpt, final = load_checkpoint(store.model_path(2)), load_checkpoint(store.final_path)

    assert round_ckpt.prepared and not final.prepared and round_ckpt.mode == final.mode == store.mode
    assert round_ckpt.meta == {"round": 2, "federation": "fed", "dataset": "pneumoniamnist"}
    with torch.no_grad():
        torch.testing.assert_close(round_ckpt.build()(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(final.build()(x), expected, atol=1e-5, rtol=1e-4)


def test_resume_refuses_a_folder_written_with_other_mode_options(tmp_path) -> None:
    store, _, _ = _store_round_and_final("lora", tmp_path)
    other = CheckpointStore(tmp_path, store.config, build_model(CONFIG), get_mode("lora", r=8), None)

    with pytest.raises(ValueError, match="in mode LoraMode"):
        other.load_latest()


@pytest.mark.integration
@pytest.mark.parametrize("name", MODES.names())
def test_fedge_export_takes_a_round_checkpoint_of_every_mode_without_a_dataset(name: str, tmp_path) -> None:
    from fedge.cli.export import export

    store, _, _ = _store_round_and_final(name, tmp_path / "ckpt", dataset="sitemnist")  # not a MedMNIST name: never downloaded
    app = typer.Typer()
    app.command()(export)

    result = CliRunner().invoke(app, [str(store.model_path(2)), "--format", "onnx", "--out", str(tmp_path / "out"), "--dataset", "nope-no-such"],
                                env={"FEDGE_DATA_DIR": str(tmp_path)})  # fmt: skip
    assert result.exit_code == 3 and "nope-no-such" in result.output  # an explicit --dataset must exist

    result = CliRunner().invoke(app, [str(store.model_path(2)), "--format", "onnx", "--out", str(tmp_path / "out")],
                                env={"FEDGE_DATA_DIR": str(tmp_path)})  # fmt: skip

    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["metric"]["torch"] is None
    assert "sitemnist not found" in result.output  # the checkpoint's dataset is not in FEDGE_DATA_DIR


def test_every_file_records_its_schema_version_and_a_newer_one_is_refused(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(CONFIG).state_dict(), CONFIG, dataset="x")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["fedge"])
    assert meta["schema_version"] == SCHEMA_VERSION and meta["config"]["schema_version"] == 1

    for key in ("schema_version", "config"):
        newer = dict(meta)
        newer[key] = {**meta["config"], "schema_version": 99} if key == "config" else 99
        save_file(load_file(str(path)), str(tmp_path / "newer.safetensors"), metadata={"fedge": json.dumps(newer)})
        with pytest.raises(SchemaVersionError, match="schema_version 99; this fedge reads 1: upgrade fedge"):
            load_checkpoint(tmp_path / "newer.safetensors")


def test_state_json_and_agent_json_refuse_a_newer_schema(tmp_path) -> None:
    from edge_client.state import AgentState

    store, _, _ = _store_round_and_final("full", tmp_path / "server")
    record = json.loads(store.state_file.read_text())
    assert record["schema_version"] == 1
    store.state_file.write_text(json.dumps({**record, "schema_version": 2}))
    with pytest.raises(SchemaVersionError, match="state.json has schema_version 2"):
        store.load_latest()

    AgentState(tmp_path / "agent").remember_update("fed", "run", 1, "0" * 64, b"envelope")
    meta_file = tmp_path / "agent" / "agent.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "schema_version": 2}))
    with pytest.raises(SchemaVersionError, match="agent.json has schema_version 2"):
        AgentState(tmp_path / "agent")


def test_a_missing_checkpoint_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="no checkpoint at"):
        load_checkpoint("/nonexistent/round_0001.safetensors")
