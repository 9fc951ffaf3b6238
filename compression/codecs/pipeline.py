"""`UpdateCodec`: a spec string parsed into [sparsifier] -> value coder -> [entropy], plus the wire format.

Payload (before the optional entropy stage): one version byte, then for each manifest tensor in
order one kind byte and its body:
  0 DENSE       values of all numel entries, by the spec's value coder
  1 SPARSE      delta+varint indices, then the kept values by the value coder
  2 SPARSE      bitmap indices, then the kept values by the value coder
  3 KEEP_DENSE  all numel entries as fp16 (names passed in keep_dense, when the value coder is lossy)
Nothing else: shapes, names and counts come from the manifest in the envelope header.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from compression.codecs.base import STAGES, CodecError, CodecSpecError, Reader, SparseTensor, TensorSpec, describe, validate_manifest
from compression.codecs.entropy import EntropyCoder
from compression.codecs.index import INDEX_CODERS, encode_indices
from compression.codecs.quantize import Fp16, Fp32, ValueCoder
from compression.codecs.sparsify import Sparsifier
from compression.error_feedback import ErrorFeedback

FORMAT_VERSION = 1
DENSE = 0
KEEP_DENSE = 3
_ORDER = {"sparsifier": 0, "values": 1, "entropy": 2}
_FLAGS = ("ef",)


def _parse_token(token: str, spec: str) -> tuple[Any, str | None, set[str]]:
    head, *flags = (part.strip() for part in token.split(","))
    name, sep, arg = head.partition(":")
    if name not in STAGES:
        raise CodecSpecError(f"unknown stage {name!r} in codec spec {spec!r}; valid stages: {', '.join(sorted(STAGES))}")
    bad = [f for f in flags if f not in _FLAGS]
    if bad or len(set(flags)) != len(flags):
        raise CodecSpecError(f"bad flag {(bad or flags)[0]!r} on {token!r} in {spec!r}; valid flags (once each): {', '.join(_FLAGS)}")
    return STAGES[name], (arg.strip() if sep else None), set(flags)


def _plaintext_bound(manifest: list[TensorSpec]) -> int:
    """Largest payload our encoder writes: per tensor kind + count + bitmap + 5 bytes per value (q8 with 8-blocks)."""
    return 1 + sum(16 + s.numel // 8 + 6 * s.numel for s in manifest)


@dataclass(frozen=True)
class UpdateCodec:
    sparsifier: Sparsifier | None
    values: ValueCoder
    entropy: EntropyCoder | None
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if self.error_feedback and self.sparsifier is None and self.values.lossless:
            raise CodecSpecError(f"'ef' needs a lossy stage (a sparsifier or a quantizer); {self.values.token()!r} is lossless")

    @classmethod
    def from_spec(cls, spec: str) -> UpdateCodec:
        """Parse `stage[:arg][,ef]|...`, e.g. 'topk:0.01,ef|q8|zstd:3'; the value coder defaults to fp32."""
        if not isinstance(spec, str) or not spec.strip():
            raise CodecSpecError(f"empty codec spec; write e.g. 'fp16' or 'topk:0.01,ef|q8|zstd' (stages: {', '.join(sorted(STAGES))})")
        stages: dict[str, object] = {}
        ef = False
        last = -1
        for token in spec.split("|"):
            if not token.strip():
                raise CodecSpecError(f"empty stage in codec spec {spec!r}; stages are joined by a single '|'")
            stage_cls, arg, flags = _parse_token(token.strip(), spec)
            stage = stage_cls.from_arg(arg)
            rank = _ORDER[stage.kind]
            if rank <= last:
                raise CodecSpecError(
                    f"{token.strip()!r} is out of place in {spec!r}: write at most one of each, in the order "
                    "sparsifier (topk/gtopk/thresh/randk) | value coder (fp32/fp16/q8/q4/ternary) | zstd"
                )
            if "ef" in flags and stage.kind == "entropy":
                raise CodecSpecError(f"'ef' on {token.strip()!r} in {spec!r}: put it on the sparsifier or quantizer")
            if "ef" in flags and ef:
                raise CodecSpecError(f"'ef' given twice in {spec!r}; one flag covers the whole pipeline")
            ef = ef or "ef" in flags
            last = rank
            stages[stage.kind] = stage
        return cls(
            sparsifier=stages.get("sparsifier"),  # type: ignore[arg-type]
            values=stages.get("values", Fp32()),  # type: ignore[arg-type]
            entropy=stages.get("entropy"),  # type: ignore[arg-type]
            error_feedback=ef,
        )

    @property
    def spec(self) -> str:
        """Canonical form: default arguments omitted, the value coder always named, `ef` on the first lossy stage."""
        ef = ",ef" if self.error_feedback else ""
        parts = []
        if self.sparsifier is not None:
            parts.append(self.sparsifier.token() + ef)
        parts.append(self.values.token() + ("" if self.sparsifier is not None else ef))
        if self.entropy is not None:
            parts.append(self.entropy.token())
        return "|".join(parts)

    @staticmethod
    def max_payload_bytes(manifest: list[TensorSpec]) -> int:
        """No payload of any spec for this manifest is larger (zstd's worst-case growth included):
        the bound a receiver enforces before it reassembles a single byte."""
        bound = _plaintext_bound(manifest)
        return bound + bound // 128 + 1024

    @property
    def uses_error_feedback(self) -> bool:
        return self.error_feedback

    @property
    def is_lossless(self) -> bool:
        return self.sparsifier is None and self.values.lossless

    @staticmethod
    def manifest(delta: Mapping[str, np.ndarray]) -> list[TensorSpec]:
        """The header entries a receiver needs to decode `delta`, in dict order."""
        specs = []
        for name, array in delta.items():
            if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
                raise CodecError(f"delta tensor {name!r} must be a floating numpy array, got {type(array).__module__}.{type(array).__name__}")
            specs.append(TensorSpec(name=name, shape=tuple(int(d) for d in array.shape), dtype=str(array.dtype)))
        return specs

    def encode(
        self,
        delta: Mapping[str, np.ndarray],
        *,
        residual: ErrorFeedback | None = None,
        keep_dense: Collection[str] = (),
        seed: int = 0,
    ) -> bytes:
        """Payload bytes for `delta`; updates `residual` (only when the spec has `ef`).

        keep_dense names skip the sparsifier and travel as fp16 (fp32 under a lossless spec):
        BatchNorm running statistics are tiny but do not sparsify or block-quantize well.
        """
        return self.encode_reconstructed(delta, residual=residual, keep_dense=keep_dense, seed=seed)[0]

    def encode_reconstructed(
        self,
        delta: Mapping[str, np.ndarray],
        *,
        residual: ErrorFeedback | None = None,
        keep_dense: Collection[str] = (),
        seed: int = 0,
    ) -> tuple[bytes, dict[str, np.ndarray]]:
        """`encode`, plus what a receiver decodes, densified (the encoder computes it anyway): the
        sender of a lossy global keeps exactly what its receivers will hold, without decoding its
        own payload again."""
        manifest = self.manifest(delta)
        unknown = set(keep_dense) - set(delta)
        if unknown:
            raise CodecError(f"keep_dense names {sorted(unknown)[:5]} are not tensors of this delta")
        rng = np.random.default_rng(seed)
        track = residual if self.error_feedback else None
        flat: dict[str, np.ndarray] = {}
        for spec in manifest:
            x = np.asarray(delta[spec.name], dtype=np.float32).reshape(-1)
            previous = track.get(spec.name, spec.shape) if track is not None else None
            if previous is not None:
                x = x + previous.reshape(-1)
            if not bool(np.isfinite(x).all()):
                raise CodecError(
                    f"delta tensor {spec.name!r} contains NaN or Inf (or overflows float32): the local training "
                    "step diverged; lower the learning rate or skip this round"
                )
            flat[spec.name] = x
        keep = set(keep_dense)
        selected = self.sparsifier.select({n: x for n, x in flat.items() if n not in keep}, rng) if self.sparsifier else {}
        parts = [bytes([FORMAT_VERSION])]
        residuals: dict[str, np.ndarray] = {}
        received: dict[str, np.ndarray] = {}
        for spec in manifest:
            x = flat[spec.name]
            if spec.name in selected:
                indices = selected[spec.name]
                tag, index_bytes = encode_indices(indices, x.size)
                value_bytes, recon = self.values.encode(x[indices], rng)
                parts += [bytes([tag]), index_bytes, value_bytes]
                dense = np.zeros(x.size, dtype=np.float32)
                dense[indices] = recon
                received[spec.name] = dense.reshape(spec.shape)
                if track is not None:
                    left = x.copy()
                    left[indices] -= recon
                    residuals[spec.name] = left.reshape(spec.shape)
                continue
            coder = self.values if spec.name not in keep or self.values.lossless else Fp16()
            value_bytes, recon = coder.encode(x, rng)
            parts += [bytes([DENSE if coder is self.values else KEEP_DENSE]), value_bytes]
            received[spec.name] = np.asarray(recon, dtype=np.float32).reshape(spec.shape)
            if track is not None:
                residuals[spec.name] = (x - recon).reshape(spec.shape)
        if track is not None:
            track.update(residuals)
        plain = b"".join(parts)
        return (self.entropy.compress(plain) if self.entropy is not None else plain), received

    def _kinds(self, kept_dense: bool | None) -> set[int]:
        """The tensor kinds this codec's encoder writes for one tensor: without a sparsifier DENSE,
        with one an index coding; a keep_dense tensor DENSE under a lossless coder, else KEEP_DENSE
        (fp16). `kept_dense` None: not known, either."""
        regular = set(INDEX_CODERS) if self.sparsifier is not None else {DENSE}
        kept = {DENSE} if self.values.lossless else {KEEP_DENSE}
        return regular | kept if kept_dense is None else kept if kept_dense else regular

    def _max_tensor_bytes(self, numel: int, kinds: set[int]) -> int:
        """The longest record (kind byte included) this codec writes for one tensor of `numel`."""
        longest = 0
        if DENSE in kinds:
            longest = self.values.max_bytes(numel)
        if KEEP_DENSE in kinds:
            longest = max(longest, Fp16().max_bytes(numel))
        if kinds & set(INDEX_CODERS) and self.sparsifier is not None:  # index kinds exist only with a sparsifier
            k = self.sparsifier.count_bounds(numel)[1]
            longest = max(longest, max(c.max_bytes(numel, k) for c in INDEX_CODERS.values()) + self.values.max_bytes(k))
        return 1 + longest

    def max_plaintext_bytes(self, manifest: list[TensorSpec], keep_dense: Collection[str] | None = None) -> int:
        """The longest payload (before zstd) this codec writes for `manifest`, tensor by tensor:
        what a decoder inflates at most. `keep_dense` names the tensors sent with keep_dense
        (None: not known, any may be)."""
        return 1 + sum(self._max_tensor_bytes(s.numel, self._kinds(None if keep_dense is None else s.name in keep_dense)) for s in manifest)

    def decode(
        self, payload: bytes, manifest: list[TensorSpec], *, max_output_bytes: int | None = None, keep_dense: Collection[str] | None = None
    ) -> dict[str, np.ndarray | SparseTensor]:
        """Tensors by manifest name: float32 arrays (dense) or SparseTensor. Any defect is a CodecError.

        What is inflated and allocated is bounded by the manifest, tensor by tensor, so the manifest
        must come from something the caller trusts (the server's own model, an agent's announced
        model). `max_output_bytes` bounds the float32 output it describes, densified (None: the
        caller holds the manifest); `keep_dense` names the tensors the sender encoded with
        keep_dense (None: not known), so each tensor's kind and the zstd frame are bounded by what
        this codec writes for it."""
        validate_manifest(manifest, max_output_bytes)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
        bound = self.max_plaintext_bytes(manifest, keep_dense)
        plain = self.entropy.decompress(bytes(payload), bound) if self.entropy is not None else payload
        if len(plain) > bound:
            raise CodecError(f"payload is {len(plain)} bytes, more than codec {self.spec!r} writes for this manifest ({bound})")
        reader = Reader(plain)
        version = reader.byte("format version")
        if version != FORMAT_VERSION:
            raise CodecError(f"payload format version {version}, this fedge reads {FORMAT_VERSION}; upgrade the older side")
        out: dict[str, np.ndarray | SparseTensor] = {}
        sparse_numel = sparse_count = 0
        for spec in manifest:
            what = f"tensor {describe(spec.name)}"
            allowed = self._kinds(None if keep_dense is None else spec.name in keep_dense)
            kind = reader.byte(f"{what} kind")
            if kind not in allowed:
                raise CodecError(f"{what}: kind byte {kind} is not valid for codec {self.spec!r} (allowed {sorted(allowed)})")
            if kind in (DENSE, KEEP_DENSE):
                coder = self.values if kind == DENSE else Fp16()
                out[spec.name] = coder.decode(reader, spec.numel, what).reshape(spec.shape)
            else:
                assert self.sparsifier is not None  # `allowed` holds index kinds only with a sparsifier
                fewest, most = self.sparsifier.count_bounds(spec.numel)
                indices = INDEX_CODERS[kind].decode(reader, spec.numel, most, what)
                if indices.size < fewest:
                    raise CodecError(f"{what}: {indices.size} entries kept, codec {self.spec!r} keeps {fewest}; the payload is not ours")
                sparse_numel += spec.numel
                sparse_count += indices.size
                out[spec.name] = SparseTensor(spec.shape, indices, self.values.decode(reader, indices.size, what))
        reader.finish()
        total = self.sparsifier.total_count(sparse_numel) if self.sparsifier is not None else None
        if total is not None and sparse_count != total:
            raise CodecError(f"{sparse_count} entries kept over the sparse tensors, codec {self.spec!r} keeps {total}; the payload is not ours")
        return out
