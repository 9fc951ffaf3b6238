"""Exporters on real onnxruntime sessions: every registered format exports, verifies and passes parity."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from exporters import (
    EXPORTERS,
    REPORT_NAME,
    CalibrationError,
    Exporter,
    ExportError,
    ExportSpec,
    UnsupportedOpError,
    export_artifact,
    export_model,
    measure_latency,
    register_exporter,
)
from exporters.base import Calibration
from exporters.onnx_int8 import ORT_DISABLED_OPTIMIZERS, saturating_int8_cpu
from exporters.ort import disabled_optimizers, ort_runner
from exporters.tensorrt import is_available as tensorrt_available
from exporters.tensorrt import trtexec_command
from exporters.triton import check_repository, parse_pbtxt
from fedge.checkpoint import save_checkpoint
from fedge.models import ModelConfig, build_model

FAST = dict(latency_warmup=1, latency_iters=5, calib_samples=64)


@pytest.fixture(scope="module")
def trained(trained_cnn):
    """The shared small CNN, 256 calibration images and a 200-image test set."""
    model, config, splits = trained_cnn
    test = (splits.images["test"][:200], splits.labels["test"][:200])
    return model, config, splits.images["train"][:256], test


def _spec(precision: str, calib: np.ndarray | None = None) -> ExportSpec:
    return ExportSpec(precision=precision, calib=calib, **FAST)  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_every_format_exports_and_passes_parity(trained, tmp_path, fmt):
    model, config, calib, test = trained
    precision = EXPORTERS.get(fmt).default_precision

    result = export_model(model, config, fmt, tmp_path, _spec(precision, calib), test)

    written = json.loads((tmp_path / REPORT_NAME).read_text())
    assert written == result.report
    assert {"format", "precision", "max_abs_diff", "metric", "latency_ms", "bytes"} <= set(written)
    assert written["format"] == fmt and written["precision"] == precision
    assert set(written["metric"]) == {"name", "torch", "exported", "delta"} and written["metric"]["name"] == "auc"
    assert written["metric"]["torch"] > 0.7, "the fixture model should be better than chance"
    for side in ("torch_eager", "exported"):
        assert 0 < written["latency_ms"][side]["p50"] <= written["latency_ms"][side]["p95"]
    assert written["bytes"] > 10_000
    assert result.passed, written["checks"]


@pytest.mark.integration
def test_onnx_fp32_matches_torch_and_loads_fresh(trained, tmp_path):
    import onnx

    model, config, _, test = trained

    result = export_model(model, config, "onnx", tmp_path, _spec("fp32"), test)

    assert result.report["max_abs_diff"] <= 1e-4
    proto = onnx.load(str(result.path))
    assert [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL] == []
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_NAME, "model.onnx"], "one file, no external data"
    fresh = ort_runner(result.path, threads=1)
    for batch in (1, 5):
        x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
        with torch.no_grad():
            np.testing.assert_allclose(fresh.run(x.numpy()), model(x).numpy(), atol=1e-4)


@pytest.mark.integration
def test_onnx_fp16_keeps_fp32_io_and_metric(trained, tmp_path):
    import onnx

    model, config, _, test = trained

    result = export_model(model, config, "onnx", tmp_path, _spec("fp16"), test)

    proto = onnx.load(str(result.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert abs(result.report["metric"]["delta"]) <= 0.01


@pytest.mark.integration
def test_int8_is_symmetric_per_channel_qdq(trained, tmp_path):
    import onnx
    from onnx import numpy_helper

    model, config, calib, test = trained

    result = export_model(model, config, "onnx-int8", tmp_path, _spec("int8", calib), test)

    proto = onnx.load(str(result.path))
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert any(n.op_type == "QuantizeLinear" for n in qdq)
    zero_points = [consts[n.input[2]] for n in qdq]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert any(consts[n.input[1]].size > 1 for n in qdq if n.op_type == "DequantizeLinear"), "weights per channel"
    assert abs(result.report["metric"]["delta"]) <= 0.01


def test_an_x86_cpu_without_vnni_is_the_one_that_saturates(tmp_path, monkeypatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
    assert saturating_int8_cpu(cpuinfo)
    for vnni in ("avx512_vnni", "avx_vnni"):
        cpuinfo.write_text(f"processor : 0\nflags : fpu avx2 {vnni}\n")
        assert not saturating_int8_cpu(cpuinfo)
    assert not saturating_int8_cpu(tmp_path / "missing")  # nothing to read: assume a capable CPU
    monkeypatch.setattr("platform.machine", lambda: "aarch64")  # Jetson: sdot kernels do not saturate
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2\n")
    assert not saturating_int8_cpu(cpuinfo)


@pytest.mark.integration
@pytest.mark.parametrize("reduce_range", [True, False])
def test_reduce_range_puts_weights_on_seven_bits(trained, tmp_path, reduce_range):
    import onnx
    from onnx import numpy_helper

    model, config, calib, test = trained
    spec = ExportSpec(precision="int8", calib=calib, calibration=Calibration(reduce_range=reduce_range), **FAST)  # type: ignore[arg-type]
    result = export_model(model, config, "onnx-int8", tmp_path, spec, test)
    proto = onnx.load(str(result.path))
    weights = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 4]
    largest = max(int(np.abs(w.astype(np.int16)).max()) for w in weights)
    assert (largest <= 64) if reduce_range else (largest == 127)
    assert ("7-bit weights" in " ".join(result.report["notes"])) == reduce_range


@pytest.mark.integration
def test_int8_resnet_runs_every_conv_in_int8_on_the_cpu(trained, tmp_path):
    """Residual blocks fan a tensor out to conv1 and the shortcut; each consumer gets its own Q->DQ
    pair and the session skips CSE (metadata), so onnxruntime turns every Conv into QLinearConv
    instead of leaving those convs in fp32 between Q/DQ."""
    import onnx
    import onnxruntime as ort

    _, _, calib, test = trained
    config = ModelConfig(arch="resnet", in_channels=1, num_classes=2, image_size=28)
    torch.manual_seed(0)
    model = build_model(config).eval()
    result = export_model(model, config, "onnx-int8", tmp_path, _spec("int8", calib), test)

    assert disabled_optimizers(result.path) == list(ORT_DISABLED_OPTIMIZERS)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled_optimizers(result.path))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 9 and "Conv" not in ops and "FusedConv" not in ops


def test_int8_without_calibration_data_says_how_to_fix(trained, tmp_path):
    model, config, _, test = trained

    with pytest.raises(CalibrationError, match="--calib"):
        export_model(model, config, "onnx-int8", tmp_path, _spec("int8"), test)


def test_int8_rejects_calibration_images_of_another_shape(trained, tmp_path):
    model, config, _, test = trained
    wrong = np.zeros((8, 64, 64, 1), dtype=np.uint8)

    with pytest.raises(CalibrationError, match=r"\(N, 28, 28, 1\)"):
        export_model(model, config, "onnx-int8", tmp_path, _spec("int8", wrong), test)


def test_checkpoint_that_does_not_match_its_config(trained, tmp_path):
    model, config, _, test = trained
    path = save_checkpoint(tmp_path / "bad.safetensors", model.state_dict(), config.replace(arch="resnet"))

    with pytest.raises(ValueError, match="does not match model config 'resnet'"):
        export_artifact(path, "onnx", tmp_path / "out", test_set=test)


@pytest.mark.integration
def test_checkpoint_round_trip_through_export_artifact(trained, tmp_path, medmnist_root):
    model, config, _, test = trained
    path = save_checkpoint(tmp_path / "ok.safetensors", model.state_dict(), config)

    result = export_artifact(path, "onnx-int8", tmp_path / "out", calib=medmnist_root / "medmnist" / "pneumoniamnist.npz", test_set=test)

    assert result.precision == "int8" and result.path.name == "model.int8.onnx" and result.passed


class _Eig(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eig(x[:, 0, :2, :2])[0].real


@pytest.mark.integration
def test_unsupported_op_is_named(trained, tmp_path):
    _, config, _, test = trained

    with pytest.raises(UnsupportedOpError, match="aten.linalg_eig"):
        export_model(_Eig(), config, "onnx", tmp_path, _spec("fp32"), test)


def test_precision_the_format_cannot_write_is_refused(trained, tmp_path):
    model, config, _, test = trained

    with pytest.raises(ValueError, match="onnx-int8 exports int8, not fp16"):
        export_model(model, config, "onnx-int8", tmp_path, _spec("fp16"), test)


def test_registry_refuses_a_second_exporter_under_a_taken_name():
    class Duplicate(Exporter):
        name = "onnx"
        precisions = ("fp32",)
        default_precision = "fp32"

    with pytest.raises(ValueError, match="already registered"):
        register_exporter(Duplicate)


def test_spec_validates_its_fields():
    with pytest.raises(ValueError, match="precision 'bf16'"):
        ExportSpec(precision="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_sizes"):
        ExportSpec(precision="fp32", batch_sizes=(0, 8))
    assert ExportSpec(precision="fp32", batch_sizes=(32, 1, 8)).batch_sizes == (1, 8, 32)


@pytest.mark.parametrize(
    ("precision", "present", "absent"),
    [("fp32", set(), {"--fp16", "--int8"}), ("fp16", {"--fp16"}, {"--int8"}), ("int8", {"--int8", "--fp16"}, set())],
)
def test_trtexec_command_flags_per_precision(precision, present, absent):
    spec = ExportSpec(precision=precision, batch_sizes=(1, 8, 32))

    cmd = trtexec_command("model.onnx", (1, 28, 28), spec)

    flags = set(cmd[1:])
    assert cmd[0] == "trtexec"
    assert {"--onnx=model.onnx", "--saveEngine=model.engine", "--timingCacheFile=timing.cache"} <= flags
    assert {"--minShapes=images:1x1x28x28", "--optShapes=images:8x1x28x28", "--maxShapes=images:32x1x28x28"} <= flags
    assert present <= flags and not (absent & flags)


@pytest.mark.integration
def test_tensorrt_export_writes_the_build_script_for_the_profile(trained, tmp_path):
    model, config, calib, test = trained
    spec = ExportSpec(precision="int8", calib=calib, profile="jetson-orin-nano-8gb", batch_sizes=(1, 4), **FAST)

    export_model(model, config, "tensorrt", tmp_path, spec, test)

    script = (tmp_path / "build_engine.sh").read_text()
    line = next(ln for ln in script.splitlines() if ln.startswith('"$TRTEXEC"'))
    assert shlex.split(line)[1:-1] == trtexec_command("model.int8.onnx", (1, 28, 28), spec)[1:]
    assert "jetson-orin-nano-8gb" in script
    assert (tmp_path / "model.int8.onnx").is_file()
    meta = json.loads((tmp_path / "engine.json").read_text())
    assert meta["precision"] == "int8" and meta["shapes"]["max"] == [4, 1, 28, 28]


@pytest.mark.integration
@pytest.mark.skipif(not tensorrt_available(), reason="tensorrt not installed")
def test_tensorrt_builds_an_engine(trained, tmp_path):  # pragma: no cover - needs a GPU with TensorRT
    model, config, _, test = trained

    result = export_model(model, config, "tensorrt", tmp_path, _spec("fp16"), test)

    assert (tmp_path / "model.engine").stat().st_size > 0 and (tmp_path / "timing.cache").is_file()
    assert json.loads((tmp_path / "engine.json").read_text())["tensorrt_version"]
    assert result.report["runtime"].startswith("tensorrt") and result.passed


@pytest.mark.integration
def test_triton_config_matches_the_onnx_graph(trained, tmp_path):
    import onnx

    model, config, _, test = trained

    result = export_model(model, config, "triton", tmp_path, _spec("fp32"), test)

    model_dir = tmp_path / "fedge_cnn"
    assert result.path == model_dir
    cfg = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert cfg["name"] == ["fedge_cnn"] and cfg["platform"] == ["onnxruntime_onnx"] and cfg["max_batch_size"] == [32]
    assert cfg["dynamic_batching"][0]["preferred_batch_size"] == [8, 32]
    for kind, values in (("input", graph.input), ("output", graph.output)):
        assert [e["name"][0] for e in cfg[kind]] == [v.name for v in values]
        for entry, value in zip(cfg[kind], values):
            assert entry["dims"] == [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
            assert entry["data_type"] == ["TYPE_FP32"] and value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.integration
def test_triton_check_catches_a_config_that_disagrees(trained, tmp_path):
    model, config, _, test = trained
    export_model(model, config, "triton", tmp_path, _spec("fp32"), test)
    config_path = tmp_path / "fedge_cnn" / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace("dims: [ 2 ]", "dims: [ 3 ]"))

    with pytest.raises(ExportError, match="output .* does not match the ONNX graph"):
        check_repository(tmp_path / "fedge_cnn")


def test_parse_pbtxt_handles_nesting_lists_and_comments():
    text = '# comment\nname: "m"\nmax_batch_size: 8\ninput [ { name: "a" dims: [ 1, 2 ] }, { name: "b" dims: [3] } ]\nx { y: TYPE_FP32 }'

    parsed = parse_pbtxt(text)

    assert parsed == {
        "name": ["m"],
        "max_batch_size": [8],
        "input": [{"name": ["a"], "dims": [1, 2]}, {"name": ["b"], "dims": [3]}],
        "x": [{"y": ["TYPE_FP32"]}],
    }
    with pytest.raises(ValueError):
        parse_pbtxt("input [ { name: ")


def test_measure_latency_orders_percentiles_and_counts_throughput():
    calls = []

    stats = measure_latency(lambda: calls.append(sum(range(2000))), warmup=3, iters=50, batch_size=8)

    assert len(calls) == 53
    assert 0 < stats.p50_ms <= stats.p95_ms <= stats.p99_ms
    assert stats.throughput == pytest.approx(8 * 1000 / stats.mean_ms)
    with pytest.raises(ValueError):
        measure_latency(lambda: None, iters=0)
