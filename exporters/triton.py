"""Triton Inference Server model repository: `<name>/config.pbtxt` and `<name>/1/model.onnx` served by
the onnxruntime backend, with the graph's input/output names, dims without the batch dimension,
data types, max_batch_size and dynamic batching."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from exporters.base import Artifact, Exporter, ExportError, ExportSpec, Runner, get_exporter, register_exporter
from exporters.ort import ort_runner
from fedge.models import ModelConfig

if TYPE_CHECKING:  # onnx loads when a repository is written or checked, not when exporters is imported (1.5 s)
    import onnx

PLATFORM = "onnxruntime_onnx"
QUEUE_DELAY_US = 100  # real-time: wait at most 0.1 ms to fill a batch

# onnx.TensorProto element types (fixed by the ONNX spec) -> Triton's names.
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 3: "TYPE_INT8", 2: "TYPE_UINT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL"}


def _io(model: onnx.ModelProto, which: str) -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims without batch) for each graph input or output."""
    initializers = {t.name for t in model.graph.initializer}
    result = []
    for value in getattr(model.graph, which):
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if not dims or not dims[0].dim_param:
            raise ExportError(f"graph {which} {value.name!r} has no dynamic batch dimension; Triton batching needs one")
        if any(not d.HasField("dim_value") for d in dims[1:]):
            raise ExportError(f"graph {which} {value.name!r} has dynamic non-batch dims; export with a fixed image size")
        if tensor.elem_type not in _TRITON_TYPES:
            raise ExportError(f"graph {which} {value.name!r} has ONNX type {tensor.elem_type}, which has no Triton mapping here")
        result.append((value.name, _TRITON_TYPES[tensor.elem_type], [d.dim_value for d in dims[1:]]))
    return result


def config_pbtxt(name: str, model: onnx.ModelProto, spec: ExportSpec) -> str:
    def block(kind: str) -> str:
        entries = [f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d))} ]\n  }}' for n, t, d in _io(model, kind)]
        return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"

    preferred = [b for b in spec.batch_sizes if b > 1]
    batching = "dynamic_batching {\n"
    if preferred:
        batching += f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
    batching += f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
    return f'name: "{name}"\nplatform: "{PLATFORM}"\nmax_batch_size: {spec.batch_sizes[-1]}\n' + block("input") + block("output") + batching


_TOKEN = re.compile(r'\s*(?:#[^\n]*|("(?:[^"\\]|\\.)*")|([\[\]{}:,])|([^\s\[\]{}:,"#]+))')


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"config.pbtxt: cannot parse near {text[pos : pos + 20]!r}")
            break
        pos = match.end()
        token = next((g for g in match.groups() if g is not None), None)
        if token is not None:
            out.append(token)
    return out


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Minimal protobuf text-format reader (enough for Triton configs, no tritonclient dependency):
    every field maps to a list of values (messages become dicts, repeated `[a, b]` are flattened)."""
    tokens = _tokens(text)

    def scalar(tok: str) -> Any:
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        for cast in (int, float):
            try:
                return cast(tok)
            except ValueError:
                pass
        return tok

    def value(i: int) -> tuple[list[Any], int]:
        if tokens[i] == "{":
            msg, i = message(i + 1, "}")
            return [msg], i + 1
        if tokens[i] == "[":
            values: list[Any] = []
            i += 1
            while tokens[i] != "]":
                if tokens[i] == ",":
                    i += 1
                    continue
                item, i = value(i)
                values += item
            return values, i + 1
        return [scalar(tokens[i])], i + 1

    def message(i: int, end: str | None) -> tuple[dict[str, list[Any]], int]:
        fields: dict[str, list[Any]] = {}
        while i < len(tokens) and tokens[i] != end:
            key = tokens[i]
            i += 2 if tokens[i + 1] == ":" else 1
            values, i = value(i)
            fields.setdefault(key, []).extend(values)
        if end is not None and i >= len(tokens):
            raise ValueError(f"config.pbtxt: missing {end!r}")
        return fields, i

    try:
        return message(0, None)[0]
    except IndexError:
        raise ValueError("config.pbtxt ends in the middle of a field") from None


def check_repository(model_dir: Path) -> None:
    """The structural contract: config.pbtxt agrees with the ONNX graph it serves."""
    config_path, onnx_path = model_dir / "config.pbtxt", model_dir / "1" / "model.onnx"
    for path in (config_path, onnx_path):
        if not path.is_file():
            raise ExportError(f"Triton repository {model_dir} lacks {path.relative_to(model_dir)}")
    config = parse_pbtxt(config_path.read_text())
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    problems = []
    if config.get("name") != [model_dir.name]:
        problems.append(f"name {config.get('name')} is not the folder name {model_dir.name!r}")
    if config.get("platform") != [PLATFORM]:
        problems.append(f"platform {config.get('platform')} is not {PLATFORM!r}")
    if not (config.get("max_batch_size") or [0])[0] > 0:
        problems.append("max_batch_size must be > 0 for a batching model")
    if "dynamic_batching" not in config:
        problems.append("no dynamic_batching block")
    for kind in ("input", "output"):
        declared = {e["name"][0]: (e["data_type"][0], e["dims"]) for e in config.get(kind, [])}
        actual = {n: (t, d) for n, t, d in _io(graph, kind)}
        if declared != actual:
            problems.append(f"{kind} {declared} does not match the ONNX graph {actual}")
    if problems:
        raise ExportError(f"{config_path}: " + "; ".join(problems))


@register_exporter
class TritonExporter(Exporter):
    name = "triton"
    precisions = ("fp32", "fp16", "int8")
    default_precision = "fp32"

    def export(self, model: nn.Module, config: ModelConfig, out_dir: Path, spec: ExportSpec) -> Artifact:
        name = spec.model_name or f"fedge_{config.arch}"
        model_dir = out_dir / name
        version = model_dir / "1"
        version.mkdir(parents=True, exist_ok=True)
        inner = get_exporter("onnx-int8" if spec.precision == "int8" else "onnx")
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".triton.") as tmp:
            built = inner.export(model, config, Path(tmp), spec)
            onnx_path = Path(shutil.move(str(built.path), version / "model.onnx"))
        config_path = model_dir / "config.pbtxt"
        import onnx

        config_path.write_text(config_pbtxt(name, onnx.load(str(onnx_path), load_external_data=False), spec))
        return Artifact(path=model_dir, onnx_path=onnx_path, files=(config_path, onnx_path), notes=built.notes)

    def verify(self, artifact: Artifact, spec: ExportSpec) -> None:
        get_exporter("onnx-int8" if spec.precision == "int8" else "onnx").verify(artifact, spec)
        check_repository(artifact.path)

    def runner(self, artifact: Artifact, spec: ExportSpec) -> Runner:
        """Triton's onnxruntime backend runs the repository's model.onnx; so does the parity check."""
        return ort_runner(artifact.onnx_path, spec.threads)
