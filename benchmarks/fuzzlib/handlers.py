"""Handler targets: the agent's `_handle` (then `_progress`, which decodes what was announced) and
the server's `_accept` then `_handle`, fed what an attacker can publish. Nothing may escape them;
a case is "refused" when the handler counted a refusal."""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass

from compression import CodecError
from fedge import weights as W
from fedge.errors import FedgeError
from fedge.protocol import ProtocolError, split_chunks
from fedge.refusals import Refusals
from fedge.transport import Message
from fuzzlib.case import Case, Caught, Target
from fuzzlib.decoders import frame, join_envelope, mutate_envelope, mutate_record, split_envelope, unframe
from fuzzlib.mutate import Raw, hostile_value, mutate_bytes, mutate_json, to_json
from fuzzlib.payloads import HOSTILE_MANIFESTS, SPECS, payload
from fuzzlib.reproducers import REPRODUCERS
from fuzzlib.world import FULL_CODEC, SITES, World

CHUNK_SIZES = (256 * 1024, 1024, 97)
REPRODUCER_SHARE = 0.005  # of a handler's cases: one of issue 18's reproducers, as they were found


def _chunk_size(rng: random.Random, blob: bytes) -> int:
    """Small chunks for small inputs only: a megabyte in 97-byte chunks is ten thousand messages."""
    return rng.choice([size for size in CHUNK_SIZES if len(blob) // size <= 1024] or [CHUNK_SIZES[0]])


@functools.lru_cache(maxsize=64)
def _reproducer_messages(world: World, name: str, signed: bool) -> tuple[Message, ...]:
    """Built once: a reproducer's bombs take longer to make than to refuse."""
    return tuple(next(r for r in REPRODUCERS if r.name == name).build(world.attack_target(signed)))


@dataclass(frozen=True)
class Prepared:
    """A handler case and the messages derived from it, built before timing and tracing."""

    case: Case
    messages: list[Message]

    @property
    def size(self) -> int:
        return sum(len(m.topic) + len(m.payload) for m in self.messages)


class AgentTarget(Target):
    """Site-1's agent, holding the server's key (`signed`) or not: mutated records and chunks on
    its topics, and mutated globals (full, delta, or through the snapshot) with the announcement
    that names them, signed with the server's key when the agent checks signatures."""

    expected = ()

    def __init__(self, world: World, signed: bool):
        self.world = world
        self.signed = signed
        self.name = "agent-signed" if signed else "agent-unsigned"
        self.weight = 6 if signed else 8
        server_key = world.signers["server"]
        topics = world.topics
        genuine_chunks = [m.payload for m in world.downlink_messages(world.full, True, 1024)[1:]]
        self.messages_by_topic = {
            topics.announce(1): ("record", world.downlink_messages(world.full, True)[0].payload, server_key),
            topics.snapshot: ("record", world.snapshot(world.full.envelope, True)[0].payload, server_key),
            topics.control: ("record", world.control(True), server_key),
            topics.global_chunk(1, 0): ("chunk", genuine_chunks[0], None),
            topics.snapshot_chunk(0): ("chunk", genuine_chunks[0], None),
            topics.announce(999_999_999): ("record", world.downlink_messages(world.full, True)[0].payload, server_key),
            f"{topics.root}/round/x/global": ("chunk", genuine_chunks[0], None),
            f"{topics.root}/round/1/global/1/2": ("chunk", genuine_chunks[0], None),
            "fedge/other/control": ("record", world.control(True), server_key),
        }
        codec = world.servers[True].uplink
        delta_payload = codec.encode(world.weights_delta(), seed=0)
        self.delta = world.downlink(2, delta_payload, codec.spec, "delta", signed=True)
        decoded = codec.decode(delta_payload, world.uplink_manifest, max_output_bytes=W.dense_bytes(world.weights))
        self.delta_sha256 = W.state_sha256(W.add(world.weights, W.densify(decoded)))

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, rng: random.Random) -> Case:
        if rng.random() < REPRODUCER_SHARE:
            return Case(self.name, "reproducer", b"", {"reproducer": rng.choice([r.name for r in REPRODUCERS if r.side == "agent"])})
        pick = rng.random()
        if pick < 0.3:
            topic = rng.choice(list(self.messages_by_topic))
            kind, raw, key = self.messages_by_topic[topic]
            scenario, blob = mutate_record(rng, raw, key) if kind == "record" else ("chunk", mutate_bytes(rng, raw, (b"FCK1",)))
            return Case(self.name, f"message-{scenario}", blob, {"topic": topic})
        kind, rnd, genuine = ("delta", 2, self.delta.envelope) if pick < 0.45 else ("full", 1, self.world.full.envelope)
        scenario, blob = self._mutate_global(rng, genuine, kind, rnd)
        meta = {"kind": kind, "round": rnd, "chunk_size": _chunk_size(rng, blob), "via": "snapshot" if pick > 0.85 and kind == "full" else "round"}
        if rng.random() < 0.15:
            meta["train"] = mutate_json(rng, {"epochs": 1, "lr": 0.001, "batch_size": 32, "mode": "full", "mode_options": {}}, 60_000).decode(
                "utf-8", "surrogatepass"
            )
            scenario += "+train"
        return Case(self.name, f"{kind}-{scenario}", blob, meta)

    def _mutate_global(self, rng: random.Random, genuine: bytes, kind: str, rnd: int) -> tuple[str, bytes]:
        if rng.random() < 0.45:
            return mutate_envelope(rng, genuine, self.world.signers["server"])
        world = self.world
        spec = FULL_CODEC if kind == "full" and rng.random() < 0.5 else rng.choice(SPECS)
        real = [(t.name, t.shape) for t in (world.full_manifest if kind == "full" else world.uplink_manifest)]
        manifest = rng.choice(HOSTILE_MANIFESTS) if rng.random() < 0.2 else real
        scenario, data = payload(rng, spec, manifest)
        entries = tuple({"name": n, "shape": list(s)} for n, s in manifest)
        return f"payload-{scenario}", world.global_envelope(rnd, data, spec, entries, rnd - 1 if kind == "delta" else None, self.signed)

    # ---- execution -----------------------------------------------------------------------------
    def messages(self, case: Case) -> list[Message]:
        """What the agent receives for this case: derived from the blob, so a shrunk blob is announced as itself."""
        world = self.world
        if "topic" in case.meta:
            return [Message(case.meta["topic"], case.blob, True)]
        if "reproducer" in case.meta:
            return list(_reproducer_messages(world, case.meta["reproducer"], self.signed))
        meta = case.meta
        sha = self.delta_sha256 if meta["kind"] == "delta" else world.model_sha256
        ann = world.announcement(meta["round"], case.blob, meta["kind"], meta["chunk_size"], model_sha256=sha)
        body = json.loads(ann.model_dump_json())
        if "train" in meta:
            body["train"] = Raw(meta["train"])
        text = to_json(body)
        signer = world.signers["server"] if self.signed else None
        wire = to_json({"sender": "server", "body": text.decode("utf-8", "surrogatepass"), "sig": signer.sign(text).hex() if signer else None})
        announce = Message(world.topics.announce(meta["round"]), wire, True)
        if meta["via"] == "snapshot":
            return world.snapshot(case.blob, self.signed, meta["chunk_size"]) + [announce]
        chunks = split_chunks(case.blob, meta["chunk_size"], transfer=bytes.fromhex(ann.downlink.transfer))
        return [announce] + [Message(world.topics.global_chunk(meta["round"], c.index), c.encode(), True) for c in chunks]

    def prepare(self, case: Case) -> Prepared:
        return Prepared(case, self.messages(case))

    def input_bytes(self, prepared: Prepared) -> int:
        return prepared.size

    def execute(self, prepared: Prepared) -> bool:
        agent = self.world.agent(self.signed, holding=prepared.case.meta.get("kind") == "delta")
        swallowed: list[BaseException] = []
        read = agent._read_global

        def watched(*args: object, **kwargs: object):
            try:
                return read(*args, **kwargs)
            except (ProtocolError, CodecError, FedgeError):  # the wire's, the codec's and the model config's errors
                raise
            except Exception as exc:  # refused as "bad-global", but a bare builtin: a defect
                swallowed.append(exc)
                raise

        agent._read_global = watched  # type: ignore[method-assign]
        for msg in prepared.messages:
            agent._handle(msg)
        agent._progress()
        _raise_caught(agent.refusals, 0, swallowed)
        return agent.refusals.total == 0


def _raise_caught(refusals: Refusals, errors_before: int, swallowed: list[BaseException] = ()) -> None:
    """Caught when the handler's safety net fired during the case, or a global failed to decode
    with a bare builtin (which the agent refuses as "bad-global", hiding the defect)."""
    if refusals.counts.get("handler-error", 0) > errors_before:
        detail = next(d for k, d in reversed(refusals.recent) if k == "handler-error")
        raise Caught(detail.split(": ", 1)[1] if ": " in detail else detail)
    if swallowed:
        raise Caught(f"{type(swallowed[0]).__name__}: {str(swallowed[0])[:300]} (decoding a global)")


class ServerTarget(Target):
    """The server with round 1 open for two sites, holding their keys (`signed`) or not: mutated
    update envelopes (re-signed with the site's key), chunk sequences, status records and topics."""

    expected = ()

    def __init__(self, world: World, signed: bool):
        self.world = world
        self.signed = signed
        self.name = "server-signed" if signed else "server-unsigned"
        self.weight = 6 if signed else 8
        self.updates = {site: world.update(site, signed) for site in SITES}

    def generate(self, rng: random.Random) -> Case:
        if rng.random() < REPRODUCER_SHARE:
            return Case(self.name, "reproducer", b"", {"reproducer": rng.choice([r.name for r in REPRODUCERS if r.side == "server"])})
        world = self.world
        site = rng.choice(SITES)
        pick = rng.random()
        if pick < 0.6:
            sub = rng.random()
            if sub < 0.45:
                scenario, blob = mutate_envelope(rng, self.updates[site], world.signers[site])
            elif sub < 0.85:
                server = world.servers[self.signed]
                real = [(t.name, t.shape) for t in server.uplink_manifest]
                spec = server.uplink.spec if rng.random() < 0.8 else rng.choice(SPECS)
                scenario, data = payload(rng, spec, real)
                scenario, blob = f"payload-{scenario}", world.update(site, self.signed, data, codec=spec)
            else:
                scenario, blob = "header-value", self._hostile_field(rng, site)
            return Case(self.name, f"update-{scenario}", blob, {"site": site, "chunk_size": _chunk_size(rng, blob)})
        if pick < 0.75:
            chunks = [c.encode() for c in split_chunks(self.updates[site], rng.choice([97, 1024]))]
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(chunks))
                chunks[i] = mutate_bytes(rng, chunks[i], (b"FCK1",))
            return Case(self.name, "chunks", frame(chunks), {"site": site})
        if pick < 0.9:
            scenario, blob = mutate_record(rng, world.status(site, True, round=1, metrics={"upload_seconds": 1.0}), world.signers[site])
            return Case(self.name, f"status-{scenario}", blob, {"topic": world.topics.status(rng.choice([site, site, "mallory"]))})
        topic = rng.choice([world.topics.update_chunk(1, site, 0), world.topics.update_chunk(2, site, 0), world.topics.status(site),
                            f"{world.topics.root}/round/1/update/{site}", f"{world.topics.root}/round/1/update/+/0", "fedge/x"])  # fmt: skip
        return Case(self.name, "message", mutate_bytes(rng, self.updates[site][:200]), {"topic": topic})

    def _hostile_field(self, rng: random.Random, site: str) -> bytes:
        """The genuine update with one header field replaced by a hostile value and re-signed."""
        header, body, _ = split_envelope(self.updates[site])
        header[rng.choice(sorted(header))] = hostile_value(rng, 1 << 20)
        return join_envelope(to_json(header), body, self.world.signers[site] if self.signed else None)

    def messages(self, case: Case) -> list[Message]:
        world = self.world
        if "topic" in case.meta:
            return [Message(case.meta["topic"], case.blob, False)]
        if "reproducer" in case.meta:
            return list(_reproducer_messages(world, case.meta["reproducer"], self.signed))
        site = case.meta["site"]
        if case.scenario == "chunks":
            raws = unframe(case.blob)
        else:
            transfer = hashlib.sha256(case.blob).digest()[:16]
            raws = [c.encode() for c in split_chunks(case.blob, case.meta["chunk_size"], transfer=transfer)]
        return [Message(world.topics.update_chunk(1, site, i), raw, False) for i, raw in enumerate(raws)]

    def prepare(self, case: Case) -> Prepared:
        return Prepared(case, self.messages(case))

    def input_bytes(self, prepared: Prepared) -> int:
        return prepared.size

    def execute(self, prepared: Prepared) -> bool:
        server, current = self.world.open_round(self.signed)
        before, errors_before = server.refusals.total, server.refusals.counts.get("handler-error", 0)
        for msg in prepared.messages:
            reason = server._accept(msg.topic)
            if reason is not None:
                server.refusals("unexpected-topic", reason)
                continue
            server._handle(msg, current)
        _raise_caught(server.refusals, errors_before)
        return server.refusals.total == before
