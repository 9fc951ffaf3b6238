"""int8 ONNX: static post-training quantization with onnxruntime in QDQ form, symmetric, per-channel
weights, zero point 0 — the explicit-quantization form TensorRT consumes — calibrated on local images."""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from exporters.base import INPUT_NAME, Artifact, Calibration, CalibrationError, Exporter, ExportError, ExportSpec, Runner, register_exporter
from exporters.onnx_fp import check_onnx_file, export_onnx
from exporters.ort import ort_runner, set_disabled_optimizers
from fedge.models import ModelConfig
from fedge.tasks import preprocess

_CALIB_BATCH = 32
# Graph optimizers onnxruntime sessions must skip to run this artifact at int8 speed on x86 CPUs
# (why: exporters.ort); recorded in the model's metadata.
ORT_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)


def load_calibration(source: np.ndarray | str | os.PathLike) -> np.ndarray:
    """Raw calibration images (uint8 NHWC) from an array or an npz file.

    An npz in MedMNIST layout gives its train split; otherwise its `images` array, or its only array.
    """
    if isinstance(source, np.ndarray):
        return source
    path = Path(source)
    if path.is_dir():
        raise CalibrationError(
            f"{path} is a folder; exporters read arrays or an npz. For a DICOM store use `fedge export --calib {path}` "
            "(it reads the store through edge_client.ingest), or pass the store's arrays"
        )
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} does not exist; pass --calib with an npz of images (e.g. the dataset's .npz)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            key = next((k for k in ("train_images", "images") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise CalibrationError(f"{path} holds {keys}; expected 'train_images' (MedMNIST layout), 'images', or a single array")
            return npz[key]
    except (OSError, ValueError) as exc:
        if isinstance(exc, CalibrationError):
            raise
        raise CalibrationError(f"{path} is not a readable npz file: {exc}") from exc


def calibration_inputs(images: np.ndarray | None, config: ModelConfig, limit: int) -> np.ndarray:
    """Validate raw images against the model and preprocess a seeded subset of at most `limit`."""
    if images is None or len(images) == 0:
        raise CalibrationError(
            "int8 export needs calibration images from the site: pass --calib PATH (an npz such as the dataset's "
            "<name>.npz, or a DICOM store folder), or ExportSpec(calib=uint8 NHWC array)"
        )
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    expected = (config.image_size, config.image_size, config.in_channels)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != expected:
        raise CalibrationError(
            f"calibration images are {x.dtype} {x.shape}; the model expects uint8 images of shape (N, {', '.join(map(str, expected))}) "
            "(raw pixels, NHWC, like the dataset's images; fedge applies the preprocessing)"
        )
    if len(x) > limit:
        x = x[np.sort(np.random.default_rng(0).choice(len(x), size=limit, replace=False))]
    return preprocess(x).numpy()


def _reader(inputs: np.ndarray):  # noqa: ANN202 - the base class lives in an optional onnxruntime module
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        """Feeds preprocessed calibration batches to the calibrator, once."""

        def __init__(self) -> None:
            self._batches = iter([inputs[i : i + _CALIB_BATCH] for i in range(0, len(inputs), _CALIB_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    return BatchReader()


def saturating_int8_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on an x86 CPU without VNNI. There onnxruntime runs a QDQ int8 conv as uint8 activations
    times int8 weights through `vpmaddubsw`, whose int16 pair sums saturate beyond 32767: 255 * 127 *
    2 does not fit, 255 * 63 * 2 does. Measured on an AVX2-only AMD EPYC: the test CNN's int8 AUC
    was 0.039 off fp32 with 8-bit weights, 0.0001 with 7. onnxruntime's answer is `reduce_range` (7-bit weights), which
    TensorRT and VNNI/ARM kernels run as any symmetric int8 QDQ model. Elsewhere (ARM, VNNI, or no
    /proc/cpuinfo to read) False."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return bool(flags) and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def quantize_qdq(fp32_path: Path, out_path: Path, inputs: np.ndarray, calibration: Calibration = Calibration()) -> Path:
    """Shape-infer and optimise (onnxruntime's quant pre-processing), then quantize statically."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # LayerNorm stays float: its per-feature weight has no channel axis to quantize along (ORT warns
    # once per layer), and TensorRT runs normalisation in fp16/fp32 in any case.
    op_types = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - {"LayerNormalization"})  # ORT's default, less LN
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[calibration.method]
    # The histogram calibrators measure |activation| when asked to, matching the symmetric int8 ranges.
    histogram = {"CalibTensorRangeSymmetric": True, "CalibPercentile": calibration.percentile} if calibration.method != "minmax" else {}

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant.") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        excluded = _nodes_of(prepared, calibration.float_ops)
        quantize_static(
            str(prepared),
            str(out_path),
            _reader(inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            op_types_to_quantize=op_types,
            nodes_to_exclude=excluded,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            reduce_range=weights_reduced(calibration),
            # Biases stay float: TensorRT's explicit quantization fuses them itself and takes no int32 DQ.
            # One Q->DQ pair per consumer of a fanned-out tensor: see ORT_DISABLED_OPTIMIZERS.
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False, "DedicatedQDQPair": True, **histogram},
        )
    set_disabled_optimizers(out_path, ORT_DISABLED_OPTIMIZERS)
    return out_path


def weights_reduced(calibration: Calibration) -> bool:
    """Whether the weights go on 7 bits: as asked, else as this CPU needs (saturating_int8_cpu)."""
    return saturating_int8_cpu() if calibration.reduce_range is None else calibration.reduce_range


def _nodes_of(path: Path, op_types: tuple[str, ...]) -> list[str]:
    """Names of the graph's nodes of these op types (what stays float)."""
    if not op_types:
        return []
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in op_types]


def check_qdq(path: Path) -> None:
    """The TensorRT explicit-quantization contract: QDQ pairs, int8, zero points all 0, per-channel weights."""
    from onnx import numpy_helper

    model = check_onnx_file(path)
    consts = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not any(n.op_type == "QuantizeLinear" for n in qdq):
        raise ExportError(f"{path.name} has no QuantizeLinear nodes; it is not a QDQ int8 model")
    per_channel = False
    for node in qdq:
        if len(node.input) < 3 or node.input[2] not in consts:
            raise ExportError(f"{path.name}: {node.op_type} {node.name!r} has no constant zero point")
        zero = numpy_helper.to_array(consts[node.input[2]])
        if zero.dtype != np.int8 or np.any(zero != 0):
            raise ExportError(f"{path.name}: {node.name!r} zero point is {zero.dtype} {zero.ravel()[:4]}; need int8 zeros (symmetric)")
        scale = consts.get(node.input[1])
        per_channel |= scale is not None and numpy_helper.to_array(scale).size > 1
    if not per_channel:
        raise ExportError(f"{path.name} quantizes no weight per channel")


@register_exporter
class OnnxInt8Exporter(Exporter):
    name = "onnx-int8"
    precisions = ("int8",)
    default_precision = "int8"

    def export(self, model: nn.Module, config: ModelConfig, out_dir: Path, spec: ExportSpec) -> Artifact:
        inputs = calibration_inputs(spec.calib, config, spec.calib_samples)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.int8.onnx"
        reduced = weights_reduced(spec.calibration)  # decided once: the quantizer and the note say the same
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fp32.") as tmp:
            fp32 = export_onnx(model, config, Path(tmp) / "model.onnx", "fp32")
            quantize_qdq(fp32, path, inputs, dataclasses.replace(spec.calibration, reduce_range=reduced))
        bits = "7-bit weights: this x86 CPU has no VNNI (see saturating_int8_cpu)" if reduced else "8-bit weights"
        return Artifact(path=path, onnx_path=path, files=(path,), notes=(f"calibrated on {len(inputs)} images ({spec.calibration}, symmetric, {bits})",))

    def verify(self, artifact: Artifact, spec: ExportSpec) -> None:
        check_qdq(artifact.onnx_path)

    def runner(self, artifact: Artifact, spec: ExportSpec) -> Runner:
        return ort_runner(artifact.onnx_path, spec.threads)
