"""onnxruntime, in one place: sessions on exported files and the session settings an artifact
carries in its own metadata.

Why an artifact carries settings: the int8 QDQ models (exporters.onnx_int8) run at int8 speed on
x86 CPUs only when a session skips some graph optimizers. The x86 CPU provider runs QLinearConv on
uint8 activations, so QDQS8ToU8 rewrites each symmetric int8 Q->DQ pair to uint8 (zero point 128)
at load time, but only a Q with a single DQ consumer. A tensor that fans out (a residual block's
input feeds conv1 and the shortcut/Add) is quantized with one dedicated Q->DQ pair per consumer
(DedicatedQDQPair), and CommonSubexpressionElimination would merge those identical Qs back into one
Q with two DQs: the pair stays int8 and every conv reading it falls back to fp32 with Q/DQ around
it (5 of 9 convs in ResNet-8, 2.6x instead of 5x over torch eager). TensorRT ignores both the extra
pairs and this metadata; the file stays in its explicit-quantization form.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exporters.base import INPUT_NAME, ExportError, Runner, UnsupportedOpError

# Model metadata key: graph optimizers a session must skip (comma separated).
DISABLED_OPTIMIZERS_KEY = "onnxruntime.disabled_optimizers"


def set_disabled_optimizers(path: Path, names: Sequence[str]) -> None:
    """Record in `path`'s metadata which optimizers every session on it must skip."""
    import onnx  # here, not at import: onnx costs 1.5 s and most users of exporters never touch a file

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, DISABLED_OPTIMIZERS_KEY: ",".join(names)})
    onnx.save(model, str(path))


def disabled_optimizers(path: Path) -> list[str]:
    """The optimizers `path`'s metadata asks sessions to skip (none for most artifacts)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return [name for name in props.get(DISABLED_OPTIMIZERS_KEY, "").split(",") if name]


def ort_runner(path: Path, threads: int, providers: Sequence[str] | None = None) -> Runner:
    """A fresh onnxruntime session on `path` (`providers` in order; default CUDA when present, else
    CPU), honouring the optimizers the artifact's metadata says to skip."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers, disabled_optimizers=disabled_optimizers(path))
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        text = str(exc)
        if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
            raise UnsupportedOpError(
                f"onnxruntime {ort.__version__} has no kernel for an operator in {path.name}: {text.splitlines()[0]}. "
                "Export at a different --precision, or replace the operator in the model."
            ) from exc
        raise ExportError(f"onnxruntime cannot load {path}: {text.splitlines()[0]}") from exc
    provider = session.get_providers()[0]

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: x})[0]

    return Runner(name=f"onnxruntime {ort.__version__} {provider}", run=run, device="cuda" if provider.startswith("CUDA") else "cpu")
