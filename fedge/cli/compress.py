"""`fedge compress`: what a codec spec would cost and lose on a real update between two checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer


def compress(
    checkpoint_a: Path = typer.Argument(..., help="The earlier checkpoint (e.g. the round's global model)"),
    checkpoint_b: Path = typer.Argument(..., help="The later checkpoint (e.g. a site's locally trained model)"),
    codec: str = typer.Option("topk:0.01,ef|q8|zstd", help="Codec spec, e.g. fp16, q8, topk:0.01,ef|q8|zstd:3"),
    keep_dense_bn: bool = typer.Option(True, "--keep-dense-bn/--sparsify-bn", help="Send BatchNorm running stats as dense fp16"),
    seed: int = typer.Option(0, help="Seed for random-k and stochastic rounding"),
    report: Path = typer.Option(None, help="Also write the numbers as JSON to this file"),
) -> None:
    """Encode B - A with a codec spec; print bytes, ratio vs fp32 and reconstruction error."""
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    from compression import CodecSpecError, UpdateCodec
    from fedge.checkpoint import load_checkpoint
    from fedge.reconstruction import reconstruction_error

    try:
        spec = UpdateCodec.from_spec(codec)
    except CodecSpecError as exc:
        raise typer.BadParameter(str(exc), param_hint="--codec") from None
    checkpoints = []
    for path, hint in ((checkpoint_a, "CHECKPOINT_A"), (checkpoint_b, "CHECKPOINT_B")):
        try:
            checkpoints.append(load_checkpoint(path).state)
        except (FileNotFoundError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint=hint) from None
    state_a, state_b = checkpoints
    floats_a = {k: v for k, v in state_a.items() if v.is_floating_point()}
    floats_b = {k: v for k, v in state_b.items() if v.is_floating_point()}
    only_a, only_b = sorted(set(floats_a) - set(floats_b)), sorted(set(floats_b) - set(floats_a))
    reshaped = sorted(k for k in set(floats_a) & set(floats_b) if floats_a[k].shape != floats_b[k].shape)
    if only_a or only_b or reshaped:
        raise typer.BadParameter(
            f"the checkpoints hold different tensors (only in A: {only_a[:5]}, only in B: {only_b[:5]}, "
            f"different shapes: {reshaped[:5]}); compare two checkpoints of the same architecture",
            param_hint="CHECKPOINT_B",
        )
    delta = {k: (floats_b[k].double() - floats_a[k].double()).float().numpy() for k in floats_a}
    keep = [k for k in delta if k.endswith(("running_mean", "running_var"))] if keep_dense_bn else []

    start = time.perf_counter()
    payload = spec.encode(delta, keep_dense=keep, seed=seed)
    encode_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    decoded = spec.decode(payload, UpdateCodec.manifest(delta))
    decode_ms = 1e3 * (time.perf_counter() - start)

    error = reconstruction_error(delta, decoded)
    max_abs = error.max_abs
    params = sum(x.size for x in delta.values())
    result = {
        "codec": spec.spec,
        "tensors": len(delta),
        "params": params,
        "fp32_bytes": 4 * params,
        "bytes": len(payload),
        "ratio_vs_fp32": 4 * params / len(payload),
        "relative_l2_error": error.relative_l2,
        "max_abs_error": max_abs,
        "encode_ms": encode_ms,
        "decode_ms": decode_ms,
        "keep_dense": keep,
    }
    table = Table(title=f"{checkpoint_a.name} -> {checkpoint_b.name} with {spec.spec}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for label, text in [
        ("tensors (float)", f"{len(delta)}, {len(keep)} dense BatchNorm stats"),
        ("parameters", f"{params:,}"),
        ("fp32 bytes", f"{4 * params:,}"),
        ("encoded bytes", f"{len(payload):,}"),
        ("ratio vs fp32", f"{result['ratio_vs_fp32']:.1f}x"),
        ("relative L2 error", f"{result['relative_l2_error']:.4g}"),
        ("max abs error", f"{max_abs:.4g}"),
        ("encode / decode ms", f"{encode_ms:.1f} / {decode_ms:.1f}"),
    ]:
        table.add_row(label, text)
    Console().print(table)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2) + "\n")
