"""Decoder targets: envelope, chunk, codec payload, manifest, codec spec and signed record.
Each may refuse only with its family's error type: ProtocolError for the wire, CodecError for codecs."""

from __future__ import annotations

import json
import math
import random
import struct

import pydantic_core

from compression import CodecError, TensorSpec, UpdateCodec
from compression.codecs.base import validate_manifest
from fedge.protocol import (
    Chunk,
    ControlMessage,
    ProtocolError,
    Reassembler,
    RoundAnnouncement,
    SnapshotAnnouncement,
    StatusMessage,
    decode_envelope,
    open_record,
    split_chunks,
)
from fedge.protocol.signing import Verifier
from fuzzlib.case import Case, Target
from fuzzlib.mutate import hostile_value, mutate_bytes, mutate_json, to_json
from fuzzlib.payloads import HOSTILE_MANIFESTS, SPECS, payload, small_manifest
from fuzzlib.world import FED, SITES, World

_PREFIX = struct.Struct(">4sI")
RECORDS = {cls.__name__: cls for cls in (RoundAnnouncement, SnapshotAnnouncement, ControlMessage, StatusMessage)}


def split_envelope(envelope: bytes) -> tuple[dict, bytes, bytes]:
    """(header dict, payload, signature) of a genuine envelope."""
    _, head_len = _PREFIX.unpack_from(envelope)
    header = json.loads(envelope[8 : 8 + head_len])
    body_end = 8 + head_len + header["payload_len"]
    return header, envelope[8 + head_len : body_end], envelope[body_end:]


def join_envelope(head: bytes, payload: bytes, signer=None) -> bytes:
    body = _PREFIX.pack(b"FDG1", len(head)) + head + payload
    return body + signer.sign(body) if signer is not None else body


def mutate_envelope(rng: random.Random, envelope: bytes, signer) -> tuple[str, bytes]:
    """A genuine envelope with its header's JSON, its bytes or its length fields mutated; a mutated
    header is re-signed with `signer` (a key holder's mistake reaches the parser behind the signature)."""
    pick = rng.randrange(10)
    if pick < 6:
        header, body, _ = split_envelope(envelope)
        return "header", join_envelope(mutate_json(rng, header, budget=1 << 20), body, signer if header.get("signed") else None)
    if pick < 9:
        return "bytes", mutate_bytes(rng, envelope, (b"FDG1", b'"manifest":', b"[" * 300, b"NaN"))
    head = rng.choice([b"[" * rng.choice([1000, 100_000]), to_json(hostile_value(rng, 1 << 20)), b"{}"])
    return "raw-header", join_envelope(head, b"")


class EnvelopeTarget(Target):
    name = "envelope"
    weight = 16
    expected = (ProtocolError,)

    def __init__(self, world: World):
        self.world = world
        self.seeds = [(world.update(site, signed), site) for site in SITES for signed in (True, False)] + [(world.full.envelope, "server")]
        self.verifier = Verifier.from_pems({name: s.public_pem() for name, s in world.signers.items()})

    def generate(self, rng: random.Random) -> Case:
        envelope, sender = rng.choice(self.seeds)
        scenario, blob = mutate_envelope(rng, envelope, self.world.signers[sender])
        return Case(self.name, scenario, blob, {"verify": rng.random() < 0.5})

    def execute(self, case: Case) -> bool:
        decode_envelope(case.blob, self.verifier if case.meta["verify"] else None)
        return True


def frame(chunks: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(c)) + c for c in chunks)


def unframe(blob: bytes) -> list[bytes]:
    """The chunk messages of a framed sequence (a malformed frame ends it)."""
    out, pos = [], 0
    while pos + 4 <= len(blob):
        (n,) = struct.unpack_from(">I", blob, pos)
        out.append(blob[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


class ChunkTarget(Target):
    """A sequence of chunk messages into one reassembler (small limits, so overflow paths run)."""

    name = "chunk"
    weight = 12
    expected = (ProtocolError,)

    def __init__(self, world: World):
        self.seeds = [world.update("site-1", True), world.full.envelope, b"", b"x" * 5000]

    def generate(self, rng: random.Random) -> Case:
        data = rng.choice(self.seeds)
        chunks = [c.encode() for c in split_chunks(data, rng.choice([64, 300, 1024, 1 << 18]))]
        rng.shuffle(chunks)
        chunks += [rng.choice(chunks) for _ in range(rng.randrange(3))]  # QoS 1 redelivery
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(chunks))
            chunks[i] = mutate_bytes(rng, chunks[i], (b"FCK1",))
        return Case(self.name, "sequence", frame(chunks), {"one_per_key": rng.random() < 0.5, "max_bytes": rng.choice([4096, 1 << 20])})

    def execute(self, case: Case) -> bool:
        reassembler = Reassembler(max_bytes=case.meta["max_bytes"], max_chunks=64, max_open=4, one_per_key=case.meta["one_per_key"])
        accepted = True
        for i, raw in enumerate(unframe(case.blob)):
            try:
                reassembler.add(f"k{i % 2}", Chunk.decode(raw))
            except ProtocolError:
                accepted = False
        return accepted


class CodecTarget(Target):
    """`UpdateCodec.decode` of a payload against a manifest the receiver holds (meta)."""

    name = "codec"
    weight = 20
    expected = (CodecError,)

    def __init__(self, world: World):
        self.real = [(t.name, t.shape) for t in world.uplink_manifest]

    def generate(self, rng: random.Random) -> Case:
        spec = rng.choice(SPECS)
        pick = rng.random()
        manifest = self.real if pick < 0.4 else small_manifest(rng) if pick < 0.995 else rng.choice(HOSTILE_MANIFESTS)
        scenario, blob = payload(rng, spec, manifest)
        numel = sum(4 * math.prod(s) for _, s in manifest)
        bound = rng.choice([numel, numel, numel // 2, 1 << 31])
        return Case(self.name, scenario, blob, {"spec": spec, "manifest": [[n, list(s)] for n, s in manifest], "max_output_bytes": bound})

    def execute(self, case: Case) -> bool:
        manifest = [TensorSpec(n, tuple(s)) for n, s in case.meta["manifest"]]
        UpdateCodec.from_spec(case.meta["spec"]).decode(case.blob, manifest, max_output_bytes=case.meta["max_output_bytes"])
        return True


class ManifestTarget(Target):
    """`TensorSpec.from_json` on every entry of a (hostile) JSON manifest, then `validate_manifest`."""

    name = "manifest"
    weight = 8
    expected = (CodecError,)

    def __init__(self, world: World):
        self.seed = [t.to_json() for t in world.uplink_manifest]

    def generate(self, rng: random.Random) -> Case:
        if rng.random() < 0.002:
            return Case(self.name, "same-name", to_json([{"name": "a", "shape": [1]}] * 40_000))
        return Case(self.name, "json", mutate_json(rng, self.seed, budget=1 << 20))

    def execute(self, case: Case) -> bool:
        try:
            entries = pydantic_core.from_json(case.blob)
        except ValueError:
            return False  # not JSON: nothing reaches the manifest parser
        if not isinstance(entries, list):
            return False  # a caller checks for a list before it reads entries
        validate_manifest([TensorSpec.from_json(e) for e in entries], 1 << 31)
        return True


class SpecTarget(Target):
    """`UpdateCodec.from_spec` on mutated spec strings; an accepted spec must be canonical on a round trip."""

    name = "codec-spec"
    weight = 6
    expected = (CodecError,)
    TOKENS = (
        b"|",
        b",",
        b":",
        b",ef",
        b"zstd",
        b"topk",
        b"gtopk",
        b"thresh",
        b"randk",
        b"q8",
        b"q4",
        b"fp16",
        b"fp32",
        b"ternary",
        b"1e-320",
        b"nan",
        b"inf",
        b"-0",
        b"99999999999999999999",
        b"\x00",
        b" ",
    )

    def generate(self, rng: random.Random) -> Case:
        return Case(self.name, "string", mutate_bytes(rng, rng.choice(SPECS).encode(), self.TOKENS))

    def execute(self, case: Case) -> bool:
        codec = UpdateCodec.from_spec(case.blob.decode("utf-8", "replace"))
        again = UpdateCodec.from_spec(codec.spec)
        if again.spec != codec.spec:
            raise AssertionError(f"spec {codec.spec!r} is not canonical: it parses back as {again.spec!r}")
        return True


def mutate_record(rng: random.Random, raw: bytes, signer) -> tuple[str, bytes]:
    """A signed record with its body's JSON (re-signed by `signer` mostly), its wrapper's JSON or its bytes mutated."""
    wire = json.loads(raw)
    pick = rng.randrange(10)
    if pick < 6:
        body = mutate_json(rng, json.loads(wire["body"]), budget=60_000).decode("utf-8", "surrogatepass")
        sig = signer.sign(body.encode("utf-8", "surrogatepass")).hex() if rng.random() < 0.8 else None
        return "body", to_json({"sender": wire["sender"], "body": body, "sig": sig})
    if pick < 8:
        return "wrapper", mutate_json(rng, wire, budget=120_000)
    return "bytes", mutate_bytes(rng, raw, (b'\\"', b"[" * 300, b"NaN"))


class RecordTarget(Target):
    """`open_record` on mutated signed records: wrapper JSON, body JSON (re-signed) and raw bytes."""

    name = "record"
    weight = 14
    expected = (ProtocolError,)

    def __init__(self, world: World):
        self.world = world
        self.verifier = Verifier.from_pems({name: s.public_pem() for name, s in world.signers.items()})
        self.seeds = [
            ("RoundAnnouncement", "server", world.downlink_messages(world.full, True)[0].payload),
            ("SnapshotAnnouncement", "server", world.snapshot(world.full.envelope, True)[0].payload),
            ("ControlMessage", "server", world.control(True)),
            ("StatusMessage", "site-1", world.status("site-1", True, round=1, metrics={"upload_seconds": 1.0})),
        ]

    def generate(self, rng: random.Random) -> Case:
        cls, sender, raw = rng.choice(self.seeds)
        scenario, blob = mutate_record(rng, raw, self.world.signers[sender])
        return Case(self.name, scenario, blob, {"cls": cls, "sender": sender, "verify": rng.random() < 0.5})

    def execute(self, case: Case) -> bool:
        verifier = self.verifier if case.meta["verify"] else None
        open_record(case.blob, RECORDS[case.meta["cls"]], verifier, federation=FED, sender=case.meta["sender"])
        return True
