"""ONNX export in fp32 or fp16: one self-contained file, opset 18, dynamic batch, fully checked."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from exporters.base import (
    INPUT_NAME,
    MIN_OPSET,
    OUTPUT_NAME,
    Artifact,
    Exporter,
    ExportError,
    ExportSpec,
    Runner,
    UnsupportedOpError,
    register_exporter,
)
from exporters.ort import ort_runner
from fedge.models import ModelConfig
from fedge.precision import Precision

if TYPE_CHECKING:  # loaded by the functions that read a file (1.5 s at import)
    import onnx

# torch.onnx warns once per torchvision op it cannot register; fedge has no torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

OPSET = 18


@functools.cache
def _fake_quant_shapes() -> None:
    """Teach torch.export the output shapes of the fake-quant op QAT models use (compression.qat).
    torch has no symbolic-shape kernel for it, so a dynamic batch dimension failed to export
    ("UnsupportedOperatorException: ..._cachemask_tensor_qparams"); the ONNX translation (a
    QuantizeLinear/DequantizeLinear pair) is torch's own. Registered once, on first export."""

    @torch.library.register_fake("aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams")
    def _shapes(x: torch.Tensor, *_qparams: object) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


class _HalfPrecision(nn.Module):
    """fp16 weights and activations inside, fp32 at the graph boundary: callers feed the same
    float32 tensors as for fp32, and onnxruntime's CPU provider casts ops it lacks fp16 kernels for."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(inner).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


def export_onnx(model: nn.Module, config: ModelConfig, path: Path, precision: Precision = "fp32") -> Path:
    """Export with the dynamo exporter (it handles every model in the zoo, so no TorchScript fallback)."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"export_onnx writes fp32 or fp16, not {precision}; int8 goes through exporters.onnx_int8")
    net = _HalfPrecision(model).eval() if precision == "fp16" else model.eval()
    _fake_quant_shapes()
    example = torch.zeros(2, config.in_channels, config.image_size, config.image_size)
    batch = torch.export.Dim("batch", min=1)
    try:
        # The exporter prints progress lines on stdout; a library call must not.
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except torch.onnx.OnnxExporterError as exc:
        raise _explain(exc, config) from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program; upgrade torch/onnxscript (dynamo exporter)")
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    check_onnx_file(path)
    return path


def _explain(exc: Exception, config: ModelConfig) -> ExportError:
    text = str(exc)
    match = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if match:
        return UnsupportedOpError(
            f"model {config.arch!r} uses {match.group(1)}, which has no ONNX conversion in torch "
            f"{torch.__version__}. Replace it with supported ops, or register an onnxscript function for it "
            "(torch.onnx.export(..., custom_translation_table=...))."
        )
    summary = next((line for line in text.splitlines() if line.startswith("<class")), text.splitlines()[0] if text else "")
    return ExportError(f"ONNX export of model {config.arch!r} failed: {summary}")


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """Full checker pass (with shape inference), opset floor, single file, dynamic batch dimension."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"{path.name} uses opset {opset}; TensorRT and onnxruntime targets need >= {MIN_OPSET}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError(f"{path.name} refers to external data files; it must be one self-contained file")
    names = [i.name for i in model.graph.input]
    if names != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"{path.name} has inputs {names}; expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}")
    if not model.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        raise ExportError(f"{path.name} has a fixed batch dimension; it must be dynamic")
    return model


@register_exporter
class OnnxExporter(Exporter):
    name = "onnx"
    precisions = ("fp32", "fp16")
    default_precision = "fp32"

    def export(self, model: nn.Module, config: ModelConfig, out_dir: Path, spec: ExportSpec) -> Artifact:
        path = export_onnx(model, config, out_dir / ("model.onnx" if spec.precision == "fp32" else "model.fp16.onnx"), spec.precision)
        return Artifact(path=path, onnx_path=path, files=(path,))

    def verify(self, artifact: Artifact, spec: ExportSpec) -> None:
        check_onnx_file(artifact.onnx_path)

    def runner(self, artifact: Artifact, spec: ExportSpec) -> Runner:
        return ort_runner(artifact.onnx_path, spec.threads)
