"""Low-dose CT denoising: real CT read in HU, the physics simulation and its cache, the RED-CNN with
FiLM, the task's metrics and local step, the in-process federation with one task per site, and the
export to ONNX / int8 QDQ ONNX with parity in PSNR."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import data_path

from edge_client.ingest.ct import NoCtError, read_ct_dir
from fedge.data.ldct import ScanProtocol, SimulationConfig, body_mask, simulate
from fedge.errors import NotFoundError, UsageError
from fedge.models import ModelConfig, build_model
from fedge.tasks.ldct import HU_SCALE, LdctTask, denoise_metrics, model_inputs, site_slices

SMALL = SimulationConfig(image_size=64)
SITE_PROTOCOLS = ("1e4:180", "5e3:90:5")  # the two sites of both broker federations (the demo and `fedge server`)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two cores shared by everything: a second torch thread only contends (a first training call
    took 8 s with two threads, 2.7 s with one, under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pair_cache(tmp_path_factory) -> Path:
    """FEDGE_CACHE_DIR for the whole session: each (slices, protocol, size) is simulated once, whichever
    test or process (the demo's evaluator, an agent) asks first; the others read the npz."""
    return tmp_path_factory.mktemp("fedge-cache")


@pytest.fixture(scope="module")
def head(data_dir: Path):
    """The 28-slice human head CT, in HU, through the project's reader."""
    [series] = read_ct_dir(data_path(data_dir, "ct", "ge_head_human_28slice"))
    return series


@pytest.fixture(scope="module")
def site(head, pair_cache: Path) -> LdctTask:
    """A tiny low-dose site: 4 slices at 64 px, one held out."""
    return LdctTask.simulate(
        head.hu[10:14], head.pixel_mm, ScanProtocol.parse("5e3:90:5"), test_slices=[1], sim=SMALL, patch=32, stride=16, cache_dir=pair_cache / "ldct"
    )


@pytest.fixture(scope="module")
def trained(site: LdctTask):
    """A small denoiser trained on `site` for 4 epochs: what the training test scores and the export tests export."""
    torch.manual_seed(0)
    config = site.model_config("redcnn", width=8, depth=3)
    model = build_model(config)
    site.train_local(model, epochs=4, lr=3e-3, batch_size=8, seed=0)
    return config, model


@pytest.fixture(scope="session")
def site_ct(data_dir: Path, tmp_path_factory) -> Path:
    """6 of the 28 head slices for the two broker federations: 3 per site (2 to test, 1 to train)."""
    ct = tmp_path_factory.mktemp("site-ct")
    for name in ("08", "10", "12", "14", "16", "18"):
        (ct / f"{name}.dcm").symlink_to(data_path(data_dir, "ct", "ge_head_human_28slice", f"{name}.dcm"))
    return ct


def test_head_ct_is_read_in_hounsfield_units(head):
    assert head.hu.shape == (28, 512, 512)
    assert head.hu.dtype == np.float32 and head.hu.min() == -1024.0  # padding below air is clipped to air
    brain = head.hu[14, 226:286, 226:286]  # the middle of the middle slice: brain tissue, about 20-50 HU
    assert 0.0 < float(np.median(brain)) < 80.0
    assert head.pixel_mm == pytest.approx(0.488, abs=1e-3)


def test_folders_without_ct_say_what_they_hold(data_dir: Path, tmp_path: Path):
    with pytest.raises(NoCtError, match="20 modality MR"):
        read_ct_dir(data_path(data_dir, "dicom", "mr_series_prostate_adc_20slice"))
    bad = data_path(data_dir, "bad_inputs")
    for name in ("MR_truncated.dcm", "no_meta.dcm"):
        shutil.copy(bad / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(NoCtError, match="unreadable.*--ct-dir|no readable CT") as info:
        read_ct_dir(tmp_path)
    assert "unreadable (no_meta)" in str(info.value)
    with pytest.raises(NotFoundError, match="--ct-dir"):
        read_ct_dir(tmp_path / "absent")


def test_protocol_parses_and_refuses_nonsense():
    assert ScanProtocol.parse("5e3:90:5") == ScanProtocol(5000.0, 90, 5.0)
    assert ScanProtocol.parse(str(ScanProtocol(2e4, 120))) == ScanProtocol(2e4, 120)
    for text, field in (("1e4", "I0:VIEWS"), ("1e4:x", "VIEWS an integer"), ("10:180", "i0=10"), ("1e4:2", "views=2"), ("1e4:90:-1", "electronic_noise")):
        with pytest.raises(UsageError, match=field):
            ScanProtocol.parse(text)


def test_lower_dose_means_more_noise_and_pairs_are_cached(head, tmp_path: Path):
    hu = head.hu[13:14]
    errors = {}
    for text in ("1e5:360", "5e3:90"):
        pairs = simulate(hu, head.pixel_mm, ScanProtocol.parse(text), SMALL, cache_dir=tmp_path)
        mask = body_mask(pairs.normal)
        errors[text] = float(np.sqrt(((pairs.low - pairs.normal)[mask] ** 2).mean()))
    assert errors["5e3:90"] > 3 * errors["1e5:360"] > 0
    assert len(list(tmp_path.glob("*.npz"))) == 2  # one file per (source, protocol)
    again = simulate(hu, head.pixel_mm, ScanProtocol.parse("5e3:90"), SMALL, cache_dir=tmp_path)
    first = np.load(next(p for p in tmp_path.glob("*.npz") if np.array_equal(np.load(p)["low"], again.low)))
    assert np.array_equal(first["normal"], again.normal)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_metrics_are_psnr_and_ssim_in_hu_over_the_body(head):
    ref = head.hu[13:15, ::8, ::8].copy()
    noisy = ref + np.random.default_rng(0).normal(0.0, 20.0, ref.shape).astype(np.float32)
    m = denoise_metrics(ref, noisy)
    assert m["psnr"] == pytest.approx(20 * np.log10(2000 / 20), abs=0.5)  # data range 2000 HU, sigma 20 HU
    with np.errstate(divide="ignore"):  # PSNR of identical images is infinite
        assert denoise_metrics(ref, ref)["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        denoise_metrics(ref, noisy * np.nan)


def test_redcnn_starts_as_identity_and_film_reads_the_protocol():
    torch.manual_seed(0)
    config = ModelConfig(arch="redcnn", in_channels=1, num_classes=1, image_size=16, options={"width": 8, "depth": 2})
    plain = build_model(config)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(plain(x), x)
    film = build_model(config.replace(in_channels=3, options={**config.options, "cond": 2}))
    torch.nn.init.normal_(film.head.weight)
    for layer in (film.film.net[-1].weight, film.film.net[-1].bias):
        torch.nn.init.normal_(layer)
    low = np.zeros((1, 16, 16), np.float32)
    a = film(model_inputs(low, np.array([[0.0, 0.0]], np.float32), 2))
    b = film(model_inputs(low, np.array([[1.0, 1.0]], np.float32), 2))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="one image channel"):
        build_model(config.replace(in_channels=3))


@pytest.mark.integration  # trains for a few epochs
def test_local_training_denoises_the_held_out_slice(site: LdctTask, trained):
    config, model = trained
    before = site.evaluate(build_model(config))
    assert before["psnr"] == pytest.approx(before["psnr_in"], abs=1e-3)  # identity at start
    after = site.evaluate(model)
    assert after["psnr"] > after["psnr_in"] + 1.0
    assert after["ssim"] > after["ssim_in"]


def test_sites_share_a_folder_without_overlap(head):
    shares = [site_slices([head], k, 4) for k in range(4)]
    seen = [j for share in shares for _, j, _ in share]
    assert sorted(seen) == list(range(28))
    assert all(sum(test for *_, test in share) == 2 for share in shares)
    with pytest.raises(UsageError, match="fewer sites"):
        site_slices([head], 0, 14)


def test_in_process_federation_takes_one_task_per_site(head, site, pair_cache: Path):
    from server.simulation import InProcessFederation, SimulationSettings
    from server.strategies import get_strategy

    other = LdctTask.simulate(
        head.hu[20:22], head.pixel_mm, ScanProtocol.parse("1e5:90"), test_slices=[1], sim=SMALL, patch=32, stride=16, cache_dir=pair_cache / "ldct"
    )
    settings = SimulationSettings(sites=2, rounds=1, codec="q8|zstd", arch="redcnn", model_options={"width": 8, "depth": 2}, batch_size=8)
    fed = InProcessFederation(settings, site, get_strategy("fedavg"), site_tasks={"low": site, "high": other})
    before = {k: v.copy() for k, v in fed.weights.items()}
    record = fed.round(1)
    assert record["updates"] == 2 and record["applied"] and not record["rejected"]
    assert any(not np.array_equal(before[k], fed.weights[k]) for k in before)
    with pytest.raises(ValueError, match="one per site"):
        InProcessFederation(settings.__class__(sites=3, arch="redcnn"), site, get_strategy("fedavg"), site_tasks={"a": site})


@pytest.mark.integration
def test_denoiser_exports_to_onnx_and_int8_with_psnr_parity(site: LdctTask, trained, tmp_path: Path):
    from exporters import Calibration
    from exporters.onnx_fp import export_onnx
    from exporters.onnx_int8 import check_qdq, quantize_qdq
    from exporters.ort import ort_runner

    config, model = trained
    x = model_inputs(site.test.low, site.test.cond, 0).numpy()
    torch_psnr = denoise_metrics(site.test.normal, site.denoise(model, site.test.low, site.test.cond))["psnr"]
    fp32 = export_onnx(model, config, tmp_path / "model.onnx")
    calib = model_inputs(site.train.low[:8], site.train.cond[:8], 0).numpy()
    calib = np.ascontiguousarray(np.block([[calib[0], calib[1]], [calib[2], calib[3]]])[None])  # four 32-px patches: one 64-px input
    int8 = quantize_qdq(fp32, tmp_path / "model.int8.onnx", calib)
    # What the benchmark found best for the denoiser: percentile ranges, the skip Adds and the BatchNorms after them float.
    mixed = quantize_qdq(fp32, tmp_path / "model.mixed.onnx", calib, Calibration("percentile", 99.9, float_ops=("Add", "BatchNormalization")))
    for path in (int8, mixed):
        check_qdq(path)  # QDQ, symmetric, per-channel weights: still the TensorRT form
    assert not _quantized_outputs(mixed) & {"Add", "BatchNormalization"} and "Relu" in _quantized_outputs(mixed)
    assert {"Add", "BatchNormalization"} <= _quantized_outputs(int8)
    for path, tolerance in ((fp32, 0.01), (int8, 1.0), (mixed, 1.0)):
        out = ort_runner(path, threads=1).run(x)[:, 0] * HU_SCALE
        assert denoise_metrics(site.test.normal, out)["psnr"] == pytest.approx(torch_psnr, abs=tolerance)


def _quantized_outputs(path: Path) -> set[str]:
    """Op types whose output goes through a QuantizeLinear (int8 in TensorRT); the others stay float."""
    import onnx

    graph = onnx.load(str(path)).graph
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    return {n.op_type for n in graph.node if quantized & set(n.output)}


def test_int8_calibration_settings_are_checked():
    from exporters import Calibration, ExportSpec

    assert ExportSpec("int8").calibration == Calibration()  # MinMax: the exporter's default is unchanged
    assert str(Calibration("percentile", 99.9, float_ops=("Add",))) == "percentile 99.9, float Add"
    for kwargs, message in (
        ({"method": "kl"}, "choose one of minmax, percentile, entropy"),
        ({"method": "percentile", "percentile": 100.0}, "90 to below 100"),
    ):
        with pytest.raises(UsageError, match=message):
            Calibration(**kwargs)


@pytest.mark.integration
def test_demo_federates_the_denoiser_over_the_broker_in_lora_mode(site_ct: Path, pair_cache: Path, tmp_path: Path, monkeypatch):
    from fedge.cli.federation import FederationSettings, run_federation

    monkeypatch.setenv("FEDGE_CACHE_DIR", str(pair_cache))  # the spawned agents read the pairs the server simulated
    settings = FederationSettings(
        task="ldct",
        ct_dir=str(site_ct),
        protocols=SITE_PROTOCOLS,
        image_size=SMALL.image_size,
        clients=2,
        rounds=1,
        arch="redcnn",
        model_options={"width": 8, "depth": 2, "cond": 2},
        mode="lora",
        codec="topk:0.1,ef|q8|zstd",
        workdir=tmp_path / "run",
    )
    report = run_federation(settings, report_path=tmp_path / "report.json")
    assert report["task"] == "ldct" and report["rejected_updates"] == 0
    assert [r["round"] for r in report["rounds"]] == [1]
    assert 15.0 < report["final"]["psnr"] < 60.0 and 0.0 < report["final"]["ssim"] <= 1.0
    assert report["rounds"][0]["uplink_bytes"] < 2 * report["dense_update_bytes"] / 4  # adapters, top-10%, 8 bits


def test_the_demo_refuses_ldct_settings_that_cannot_run(tmp_path: Path):
    from fedge.cli.federation import FederationSettings, run_federation

    ldct = {"task": "ldct", "clients": 2, "protocols": SITE_PROTOCOLS, "arch": "redcnn", "workdir": tmp_path / "x"}
    for change, message in (
        ({"protocols": ("1e4:180",)}, "one --protocol per site"),
        ({"arch": "cnn"}, "use --arch redcnn"),
        ({"dp_noise_multiplier": 1.0}, "DP-SGD is not available"),
    ):
        with pytest.raises(ValueError, match=message):
            run_federation(FederationSettings(**{**ldct, **change}))  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()  # refused before the workdir is made


def test_an_ldct_agent_needs_its_protocol_and_a_ct_folder(data_dir: Path, tmp_path: Path):
    from edge_client.config import AgentConfig
    from edge_client.runner import build_ldct_task

    base = {"broker": "mqtt://127.0.0.1:1", "site": "s1", "task": "ldct", "state_dir": tmp_path}
    with pytest.raises(ValueError, match="protocol: I0:VIEWS"):
        build_ldct_task(AgentConfig(**base))
    with pytest.raises(NoCtError, match="modality MR"):
        build_ldct_task(AgentConfig(**base, protocol="1e4:180", ct_dir=data_path(data_dir, "dicom", "mr_series_prostate_adc_20slice")))


def _invoke_server(*args: str) -> tuple[int, str]:
    """`fedge server` in this process: for the refusals, which all happen before a broker starts."""
    import typer
    from typer.testing import CliRunner

    from fedge.cli.server import server

    app = typer.Typer()
    app.command()(server)
    result = CliRunner().invoke(app, ["--quiet", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())


def test_fedge_server_refuses_ldct_settings_that_cannot_run(data_dir: Path):
    mr = str(data_path(data_dir, "dicom", "mr_series_prostate_adc_20slice"))
    for args, message in (
        (("--task", "ldct", "--arch", "cnn"), "--arch cnn does not fit --task ldct: use --arch redcnn"),
        (("--arch", "redcnn"), "--arch redcnn does not fit --task classification"),
        (("--task", "denoise"), "choose one of classification, ldct"),
        (("--task", "ldct", "--protocol", "1e4"), "I0:VIEWS"),
        (("--task", "ldct", "--protocol", "1e4:180"), "add --ct-dir"),
        (("--task", "ldct", "--dp-noise-multiplier", "1.0"), "DP-SGD is not available for the ldct task"),
        (("--ct-dir", mr), "options of the ldct task: add --task ldct"),
        (("--task", "ldct", "--ct-dir", mr), "20 modality MR"),
    ):
        code, output = _invoke_server(*args)
        assert code == 2 and output.startswith("error:") and message in output, (args, output)


@pytest.mark.integration  # a broker, a `fedge server` process and two `fedge agent run` processes
def test_fedge_server_runs_the_ldct_task_with_agents_as_separate_processes(data_dir: Path, site_ct: Path, pair_cache: Path, tmp_path: Path):
    """What a deployment runs: the server scores each global on its own CT (a scanner no site has),
    the agents train on theirs, each from its YAML (task, ct_dir, protocol)."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from fedge.broker import EmbeddedBroker
    from fedge.checkpoint import load_checkpoint

    env = {**os.environ, "FEDGE_CACHE_DIR": str(pair_cache)}
    fedge = [sys.executable, "-m", "fedge.cli.main"]
    server_ct = data_path(data_dir, "dicom", "ct_series_liver_3slice")
    with EmbeddedBroker() as broker:
        agents = []
        for i, protocol in enumerate(SITE_PROTOCOLS):
            site = f"site-{i + 1}"
            config = tmp_path / f"{site}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "broker": broker.url,
                        "site": site,
                        "federation": "ldct",
                        "task": "ldct",
                        "ct_dir": str(site_ct),
                        "protocol": protocol,
                        "image_size": SMALL.image_size,
                        "shard": i,
                        "num_shards": 2,
                        "state_dir": site,
                    }
                )
            )
            agents.append(
                subprocess.Popen(
                    [*fedge, "agent", "run", "--config", str(config)], env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{site}.log", "wb")
                )
            )
        server = subprocess.run(
            [
                *fedge,
                "server",
                "--broker",
                broker.url,
                "--federation",
                "ldct",
                "--task",
                "ldct",
                "--ct-dir",
                str(server_ct),
                "--protocol",
                "2e4:120",
                "--image-size",
                "64",
                "--rounds",
                "2",
                "--min-clients",
                "2",
                "--clients",
                "site-1,site-2",
                "--batch-size",
                "8",
                "--codec",
                "q8|zstd",
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                "--round-timeout",
                "120",
                "--quiet",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert server.returncode == 0, server.stderr[-3000:]
        for site, agent in zip(("site-1", "site-2"), agents):
            assert agent.wait(timeout=60) == 0, (tmp_path / f"{site}.log").read_text()[-3000:]
    history = json.loads((tmp_path / "ckpt" / "state.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2] and all(r["rejected"] == 0 for r in history)
    # The scores are the task's, on the server's --ct-dir under its --protocol at its --image-size (the pairs come from the cache it wrote).
    from fedge.tasks.ldct import LdctTask

    scoring = LdctTask.scoring(read_ct_dir(server_ct), [ScanProtocol.parse("2e4:120")], sim=SMALL, cache_dir=pair_cache / "ldct")
    assert len(scoring.test) == 3 and not len(scoring.train)
    before = denoise_metrics(scoring.test.normal, scoring.test.low)
    for record in history:
        assert record["psnr_in"] == pytest.approx(before["psnr"]) and record["ssim_in"] == pytest.approx(before["ssim"])
        assert 15.0 < record["psnr"] < 60.0 and 0.0 < record["ssim"] <= 1.0
    assert history[-1]["psnr"] != pytest.approx(history[-1]["psnr_in"], abs=1e-3)  # the identity-initialised denoiser was trained
    final = load_checkpoint(tmp_path / "ckpt" / "final.safetensors")
    assert final.config.arch == "redcnn" and final.config.image_size == 64
    assert final.build()(model_inputs(scoring.test.low, scoring.test.cond, 0)).shape == (3, 1, 64, 64)


def test_the_operator_sees_every_task_headline_metric():
    from fedge.tasks.base import HEADLINE
    from server.metrics import EVALUATED, RECORD_NUMBERS

    assert {m for pair in HEADLINE.values() for m in pair} == set(EVALUATED) <= set(RECORD_NUMBERS)  # Prometheus gauges, dashboard rows


def test_the_denoiser_follows_scaffolds_correction_and_refuses_logit_adjustment(site: LdctTask) -> None:
    """SCAFFOLD's correction holds for any task (the sites differ by scan protocol); logit adjustment has no labels to act on."""
    from fedge import controlvariates as CV
    from fedge.errors import UsageError

    config = site.model_config("redcnn", width=8, depth=3)
    moved = []
    for shift in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model(config)
        correction = {n: np.full(tuple(p.shape), shift, np.float32) for n, p in model.named_parameters()}
        result = site.train_local(model, epochs=1, lr=1e-3, batch_size=8, seed=0, correction=correction)
        assert set(result.mean_gradient) == set(CV.parameter_names(model))
        moved.append(float(sum(p.detach().sum() for p in model.parameters())))
    assert moved[1] < moved[0]  # a positive correction on every gradient pushes every weight down
    with pytest.raises(UsageError, match="logit"):
        site.train_local(build_model(config), epochs=1, logit_adjust=1.0)


def test_the_denoiser_trains_with_the_announced_optimizer(site: LdctTask) -> None:
    """TrainSettings.optimizer reaches the denoiser's step too: SGD's first step is lr x the gradient, Adam's about lr a weight."""
    config = site.model_config("redcnn", width=8, depth=3)
    steps = {}
    for name in ("adam", "sgd"):
        torch.manual_seed(0)
        model = build_model(config)
        before = [p.detach().clone() for p in model.parameters()]
        result = site.train_local(model, epochs=1, lr=1e-3, batch_size=8, seed=0, optimizer=name)
        assert np.isfinite(result.loss)
        steps[name] = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    assert steps["sgd"] < steps["adam"] / 10  # MSE gradients in HU/1000 are small: plain lr x gradient barely moves
