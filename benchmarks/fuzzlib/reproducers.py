"""The findings of issue 18 as the MQTT messages that reproduce them, for any federation: the
regression tests feed them to the handlers directly, the Mosquitto test publishes them.

Each reproducer is built from a `Target` (what the attacker knows of the open round: federation,
run, round, the announced model's digest, the uplink codec and manifest) and the keys the attacker
holds: signing with a real key is a key holder's mistake, which must still be refused, not crash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from compression import TensorSpec
from fedge.protocol import EnvelopeHeader, RoundAnnouncement, Topics, TransferInfo, encode_envelope, split_chunks
from fedge.protocol.signing import Signer
from fedge.rounds import Manifest
from fedge.transport import Message

NESTED = 100_000  # '[' in a header, within its 1 MiB bound
SAME_NAME = 40_000  # manifest entries sharing one name (~1 MB of header)
INVALID_ITEMS = 520_000  # invalid manifest items in a 1 MiB header
BOMB_ELEMENTS = 16 << 20  # a 64 MiB dense tensor, in about 2.5 KB of zstd
DENSIFY_ELEMENTS = 1 << 29  # 2 GiB as float32
LARGE_WIDTH = 1024  # two 1024-channel convolutions: about 38 MB of float32 state
DEEP_LAYERS = 5000  # a 15 KB list of layer widths


@dataclass(frozen=True)
class Target:
    """What an attacker on the broker knows of the open round, and the keys it holds."""

    federation: str
    run: str
    round: int
    model_sha256: str  # of the global the open round announced
    uplink_codec: str
    uplink_manifest: tuple[TensorSpec, ...]
    model: dict  # the model config, as globals carry it
    server: Signer | None
    sites: dict[str, Signer | None]
    victim: str = "site-2"  # the selected site whose name the update reproducers use

    @property
    def victim_key(self) -> Signer | None:
        return self.sites.get(self.victim)

    @property
    def topics(self) -> Topics:
        return Topics(self.federation)


@dataclass(frozen=True)
class Reproducer:
    name: str
    side: str  # "server" (update and status topics) or "agent" (announcements, globals, control)
    finding: str
    build: Callable[[Target], list[Message]]


# ---- the server's side: update envelopes in a selected site's name ------------------------------
def _raw_envelope(head: bytes, payload: bytes = b"") -> bytes:
    return b"FDG1" + len(head).to_bytes(4, "big") + head + payload


def _update_messages(t: Target, site: str, envelope: bytes) -> list[Message]:
    return [Message(t.topics.update_chunk(t.round, site, c.index), c.encode(), False) for c in split_chunks(envelope)]


def _update_header(t: Target, site: str, **fields: object) -> dict:
    base = dict(kind="update", federation=t.federation, round=t.round, sender=site, codec=t.uplink_codec,
                manifest_sha256=Manifest(t.uplink_manifest).digest, num_samples=100, run=t.run, model_sha256=t.model_sha256)  # fmt: skip
    return json.loads(EnvelopeHeader(**(base | fields)).model_dump_json())


def nested_update(t: Target) -> list[Message]:
    return _update_messages(t, t.victim, _raw_envelope(b"[" * NESTED))


def invalid_items_update(t: Target) -> list[Message]:
    head = json.dumps(_update_header(t, t.victim), separators=(",", ":"))[:-1].encode() + b',"manifest":[' + b",".join([b"1"] * INVALID_ITEMS) + b"]}"
    return _update_messages(t, t.victim, _raw_envelope(head))


def same_name_update(t: Target) -> list[Message]:
    header = _update_header(t, t.victim, manifest_sha256=None) | {"manifest": [{"name": "a", "shape": [1]}] * SAME_NAME}
    return _update_messages(t, t.victim, _raw_envelope(json.dumps(header, separators=(",", ":")).encode()))


def bomb_update(t: Target) -> list[Message]:
    """A zstd frame of 64 MiB of zeros (2.5 KB) as a selected site's signed update payload."""
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
    header = EnvelopeHeader(**_update_header(t, t.victim))
    return _update_messages(t, t.victim, encode_envelope(header, frame, t.victim_key))


# ---- the agent's side: announcements and globals ---------------------------------------------------
def _signed(t: Target, body: dict) -> bytes:
    text = json.dumps(body, separators=(",", ":"))
    sig = t.server.sign(text.encode()).hex() if t.server is not None else None
    return json.dumps({"sender": "server", "body": text, "sig": sig}).encode()


def _announcement(t: Target, envelope: bytes, **train: object) -> dict:
    chunks = split_chunks(envelope, transfer=hashlib.sha256(envelope).digest()[:16])
    transfer = TransferInfo(transfer=chunks[0].transfer.hex(), chunks=len(chunks), bytes=len(envelope), sha256=hashlib.sha256(envelope).hexdigest())
    ann = RoundAnnouncement(round=t.round, deadline=0, selected=(), model_sha256=hashlib.sha256(envelope).hexdigest(), downlink=transfer,
                            downlink_kind="full", uplink_codec=t.uplink_codec, federation=t.federation, sender="server", run=t.run)  # fmt: skip
    body = json.loads(ann.model_dump_json())
    body["train"].update(train)
    return body


def _global_messages(t: Target, envelope: bytes, **train: object) -> list[Message]:
    """A signed announcement naming `envelope` (so its bytes pass the digest check), then its chunks."""
    body = _announcement(t, envelope, **train)
    chunks = split_chunks(envelope, transfer=bytes.fromhex(body["downlink"]["transfer"]))
    return [Message(t.topics.announce(t.round), _signed(t, body), False)] + [
        Message(t.topics.global_chunk(t.round, c.index), c.encode(), False) for c in chunks
    ]


def _global(t: Target, codec: str, manifest: list[dict], payload: bytes, model: dict | None = None) -> bytes:
    """A global envelope around `payload`, its header written compactly (entries without dtype, as
    an attacker would, to fit more of them in the 1 MiB header) and signed with the server's key if held."""
    header = json.loads(EnvelopeHeader(kind="global", federation=t.federation, round=t.round, sender="server", codec=codec,
                                       model=model or t.model, run=t.run).model_dump_json())  # fmt: skip
    header |= {"manifest": manifest, "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_len": len(payload), "signed": t.server is not None}
    body = _raw_envelope(json.dumps(header, separators=(",", ":")).encode(), payload)
    return body + t.server.sign(body) if t.server is not None else body


def _announce_only(t: Target, **train: object) -> list[Message]:
    return _global_messages(t, b"never fetched", **train)[:1]


def control_not_an_object(t: Target) -> list[Message]:
    return [Message(t.topics.control, raw, False) for raw in (b"1", b"[]", b"null")]


def train_mode_list(t: Target) -> list[Message]:
    return _announce_only(t, mode=["full"])


def train_mode_object(t: Target) -> list[Message]:
    return _announce_only(t, mode={"a": 1})


def mode_options_list(t: Target) -> list[Message]:
    return _announce_only(t, mode_options=[1])


def nested_global(t: Target) -> list[Message]:
    return _global_messages(t, _raw_envelope(b"[" * 1000))


def same_name_global(t: Target) -> list[Message]:
    """40,000 manifest entries named alike: the codec's duplicate check was quadratic (22 s)."""
    return _global_messages(t, _global(t, "fp32", [{"name": "a", "shape": [1]}] * SAME_NAME, b"\x01" + b"\x00" * 5 * SAME_NAME))


def bomb_global(t: Target) -> list[Message]:
    """A valid fp32|zstd global of one 64 MiB zero tensor, 2.5 KB on the wire."""
    cctx = zstandard.ZstdCompressor(level=1).compressobj(size=2 + 4 * BOMB_ELEMENTS)
    frame = cctx.compress(b"\x01\x00") + b"".join(cctx.compress(bytes(1 << 22)) for _ in range(16)) + cctx.flush()
    return _global_messages(t, _global(t, "fp32|zstd:1", [{"name": "w", "shape": [BOMB_ELEMENTS]}], frame))


def densify_global(t: Target) -> list[Message]:
    """An empty sparse tensor on a 2^29-element entry: 3 payload bytes the agent densified to 2 GiB."""
    return _global_messages(t, _global(t, "topk:0.1|fp32", [{"name": "w", "shape": [DENSIFY_ELEMENTS]}], b"\x01\x01\x00"))


def _model_config_global(t: Target, widths: object) -> list[Message]:
    """A global of zeros for the announced manifest, whose model config names other widths."""
    plain = b"\x01" + b"".join(b"\x00" + bytes(4 * spec.numel) for spec in t.uplink_manifest)
    manifest = [{"name": spec.name, "shape": list(spec.shape)} for spec in t.uplink_manifest]
    model = t.model | {"options": t.model.get("options", {}) | {"widths": widths}}
    return _global_messages(t, _global(t, "fp32|zstd:1", manifest, zstandard.ZstdCompressor(level=1).compress(plain), model))


def model_config_wrong_type(t: Target) -> list[Message]:
    """Found by the campaign: widths that are not numbers made building the model raise TypeError,
    which escaped the agent's loop (only ProtocolError, CodecError and ValueError were refused)."""
    return _model_config_global(t, [{"a": 1}])


def model_config_impossible(t: Target) -> list[Message]:
    """Found by the campaign: a layer of 2^40 channels made torch raise RuntimeError (cannot allocate)."""
    return _model_config_global(t, [1 << 40])


def model_config_large(t: Target) -> list[Message]:
    """Found by the campaign: widths the allocator grants (1024x1024x3x3 and up, 14 GB in one case)
    were built for real, initialised and kept, before the manifest check could refuse the global."""
    return _model_config_global(t, [LARGE_WIDTH, LARGE_WIDTH])


def model_config_deep(t: Target) -> list[Message]:
    """Found by the campaign: a 4 KB config naming a thousand layers took seconds to build (20,000: 17 s on the meta device)."""
    return _model_config_global(t, [4] * DEEP_LAYERS)


REPRODUCERS = (
    Reproducer("nested-header-update", "server", "RecursionError escapes decode_envelope", nested_update),
    Reproducer("invalid-manifest-items-update", "server", "validation errors cost more than the input", invalid_items_update),
    Reproducer("same-name-manifest-update", "server", "quadratic manifest validation", same_name_update),
    Reproducer("zstd-bomb-update", "server", "decompression bomb", bomb_update),
    Reproducer("control-not-an-object", "agent", "AttributeError on a control payload that is not an object", control_not_an_object),
    Reproducer("train-mode-list", "agent", "TypeError (unhashable) in the mode lookup", train_mode_list),
    Reproducer("train-mode-object", "agent", "TypeError (unhashable) in the mode lookup", train_mode_object),
    Reproducer("mode-options-list", "agent", "TypeError on mode_options [1]", mode_options_list),
    Reproducer("nested-header-global", "agent", "RecursionError on the agent's global decode", nested_global),
    Reproducer("same-name-manifest-global", "agent", "quadratic manifest validation", same_name_global),
    Reproducer("zstd-bomb-global", "agent", "decompression bomb", bomb_global),
    Reproducer("densify-global", "agent", "densify of a declared shape", densify_global),
    Reproducer("model-config-wrong-type", "agent", "TypeError from the model config escaped the agent (campaign)", model_config_wrong_type),
    Reproducer("model-config-impossible", "agent", "RuntimeError from the model config escaped the agent (campaign)", model_config_impossible),
    Reproducer("model-config-large", "agent", "a model config from the wire built for real, however large (campaign)", model_config_large),
    Reproducer("model-config-deep", "agent", "a model config of thousands of layers took seconds to build (campaign)", model_config_deep),
)
