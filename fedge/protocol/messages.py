"""Small signed records: round announcements, snapshot pointers, control and site status.

Wire form (JSON, so operators can read it with `mosquitto_sub`):
`{"sender": NAME, "body": "<the record as a JSON string>", "sig": "<Ed25519 signature, hex>"|null}`.
The signature covers the body's exact bytes, so nothing is canonicalised; the receiver checks
size, then the signature, and only then parses the body (pydantic's JSON parser, which bounds
nesting). Every record names its federation and sender and says when it was issued; everything
the server sends also names the run, so a record recorded in one run means nothing in another.
"""

from __future__ import annotations

import time
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer, model_validator

from fedge.protocol.envelope import NAME_PATTERN, RUN_PATTERN, SHA256_PATTERN
from fedge.protocol.errors import ProtocolError, first_error
from fedge.protocol.signing import SignatureError, Signer, Verifier

MAX_RECORD_BYTES = 64 * 1024
ModeName = Literal["full", "lora", "pruned", "qat"]
MODE_NAMES: tuple[str, ...] = get_args(ModeName)
LocalOptimizer = Literal["adam", "sgd"]  # built by fedge.tasks.optimizer (this module imports no torch)
LOCAL_OPTIMIZERS: tuple[str, ...] = get_args(LocalOptimizer)
STATUS_METRICS = frozenset({"upload_seconds", "upload_bytes", "dp_epsilon"})  # dp_epsilon: the site's DP-SGD spend so far

OptionValue = bool | int | float | str | tuple[str, ...]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TransferInfo(_Message):
    """Where a chunked envelope lives and how to check it once reassembled."""

    transfer: str = Field(pattern=r"^[0-9a-f]{32}$")
    chunks: int = Field(ge=1, le=1 << 20)
    bytes: int = Field(ge=0, le=1 << 40)
    sha256: str = Field(pattern=SHA256_PATTERN)


class TrainSettings(_Message):
    """What a site's local training does in a round: validated here, so an agent never trains on
    a value nobody checked (a signed announcement is still bounded: a compromised server key
    cannot ask for a million epochs)."""

    epochs: int = Field(default=1, ge=1, le=1000)
    lr: float = Field(default=1e-3, gt=0, le=10.0)
    batch_size: int = Field(default=32, ge=1, le=65536)
    # The local step's optimizer: Adam (restarted every round), or SGD with momentum 0.9, whose steps
    # scale with the gradient, so a site that has little left to learn moves little (DP-SGD is always SGD).
    optimizer: LocalOptimizer = "adam"
    mode: ModeName = "full"
    mode_options: dict[str, OptionValue] = Field(default_factory=dict, max_length=32)
    # Record-level DP (DP-SGD at every site, fedge.tasks.dp): off unless a noise multiplier is announced.
    dp_noise_multiplier: float | None = Field(default=None, gt=0, le=100)
    dp_max_grad_norm: float = Field(default=1.0, gt=0, le=1e4)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    # Non-IID strategies (server.strategies): FedProx's proximal weight mu (0: plain local training),
    # and FedBN's normalisation layers kept at the site (they are in neither the global nor the update).
    prox_mu: float = Field(default=0.0, ge=0, le=1e3)
    local_norm: bool = False
    # Random flips and shifts of each training batch (fedge.tasks.augment): for sites with a few hundred images.
    augment: bool = False
    # Label skew (fedge.tasks.classification): each site adds tau * log(its class prior) to the logits in
    # its loss (logit adjustment, Menon et al. 2021), 0: plain cross-entropy. SCAFFOLD's control
    # variates (fedge.controlvariates): the global carries the server's, each update the site's change.
    logit_adjust: float = Field(default=0.0, ge=0, le=10)
    control_variates: bool = False
    # A head-calibration round (fedge.tasks.calibration): no training; each site sends the class counts,
    # class feature sums and Gram matrix of the global's head input over its images, which the server
    # sums into the LDA head of the final model.
    calibrate_head: bool = False

    @model_validator(mode="after")
    def _dp_alone(self) -> TrainSettings:
        if self.dp_noise_multiplier is not None:
            for name, on in (("augment", self.augment), ("logit_adjust", self.logit_adjust > 0), ("control_variates", self.control_variates)):
                if on:
                    raise ValueError(f"{name} is not implemented with DP-SGD (opacus runs its own training loop): leave out one of them")
            if self.calibrate_head:
                raise ValueError("calibrate_head would send the sites' class feature sums without the noise DP-SGD adds: leave out one of them")
        return self

    @model_serializer(mode="wrap")
    def _without_unused_newer_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """optimizer, prox_mu, local_norm, augment, logit_adjust, control_variates and calibrate_head are left out at their defaults: agents from before them (whose
        records forbid unknown fields) still accept every announcement that does not use them."""
        data = handler(self)
        for key, default in NEWER_DEFAULTS.items():
            if key in data and data[key] == default:
                del data[key]
        return data


NEWER_DEFAULTS: dict[str, object] = {
    "optimizer": "adam",
    "prox_mu": 0.0,
    "local_norm": False,
    "augment": False,
    "logit_adjust": 0.0,
    "control_variates": False,
    "calibrate_head": False,
}


class Record(_Message):
    federation: str = Field(pattern=NAME_PATTERN)
    sender: str = Field(pattern=NAME_PATTERN)
    issued_at: float = Field(default_factory=time.time, ge=0)


class ServerRecord(Record):
    """Sent by the server: bound to one run (random, kept across the server's restarts)."""

    run: str = Field(pattern=RUN_PATTERN)


class RoundAnnouncement(ServerRecord):
    """Retained on `round/<r>/global`: everything an agent needs to take part in round r."""

    kind: Literal["announce"] = "announce"
    round: int = Field(ge=1, le=10**9)
    deadline: float
    selected: tuple[str, ...] = Field(default=(), max_length=100_000, fail_fast=True)  # one error, not one per item
    model_sha256: str = Field(pattern=SHA256_PATTERN)  # of the global weights the round starts from
    downlink: TransferInfo
    downlink_kind: Literal["full", "delta"]
    base_round: int | None = Field(default=None, ge=0)
    uplink_codec: str = Field(min_length=1, max_length=256)
    train: TrainSettings = TrainSettings()
    # Asynchronous rounds (FedBuff): updates trained from any of versions round - max_staleness .. round
    # are accepted. None: synchronous, only this round's. Left out of the JSON when None, so agents from
    # before it (records forbid unknown fields) accept every synchronous announcement.
    max_staleness: int | None = Field(default=None, ge=0, le=1000)

    @model_serializer(mode="wrap")
    def _without_unused_newer_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("max_staleness", 0) is None:
            del data["max_staleness"]
        return data


class SnapshotAnnouncement(ServerRecord):
    """Retained on `snapshot`: the latest full global model, for agents that are new or missed rounds."""

    kind: Literal["snapshot"] = "snapshot"
    round: int = Field(ge=0, le=10**9)
    model_sha256: str = Field(pattern=SHA256_PATTERN)
    transfer: TransferInfo


class ControlMessage(ServerRecord):
    """Retained on `control`: the federation's run ended after `round`."""

    kind: Literal["control"] = "control"
    command: Literal["finished"]
    round: int = Field(ge=0, le=10**9)


class StatusMessage(Record):
    """Retained on `status/<site>`: online/offline (the offline one is the MQTT last will)."""

    kind: Literal["status"] = "status"
    state: Literal["online", "offline", "training", "done"]
    round: int | None = Field(default=None, ge=0, le=10**9)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=len(STATUS_METRICS))


class _Wire(_Message):
    sender: str = Field(pattern=NAME_PATTERN)
    body: str = Field(max_length=MAX_RECORD_BYTES)
    sig: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


R = TypeVar("R", bound=Record)


def sign_record(record: Record, signer: Signer | None) -> bytes:
    body = record.model_dump_json()
    sig = signer.sign(body.encode()).hex() if signer is not None else None
    return _Wire(sender=record.sender, body=body, sig=sig).model_dump_json().encode()


def open_record(raw: bytes, cls: type[R], verifier: Verifier | None, *, federation: str, sender: str | None = None) -> R:
    """The record in `raw`, or ProtocolError with the reason. With a verifier, unsigned or
    wrongly signed records are refused before their body is parsed."""
    if len(raw) > 2 * MAX_RECORD_BYTES:
        raise ProtocolError(f"{cls.__name__} of {len(raw)} bytes is over the {2 * MAX_RECORD_BYTES}-byte limit")
    try:
        wire = _Wire.model_validate_json(raw)
    except ValidationError as exc:
        raise ProtocolError(f"not a signed record: {first_error(exc)}") from None
    if sender is not None and wire.sender != sender:
        raise ProtocolError(f"{cls.__name__} from {wire.sender!r}, expected {sender!r}")
    if verifier is not None:
        if wire.sig is None:
            raise SignatureError(f"unsigned {cls.__name__} from {wire.sender!r}, but signatures are required")
        verifier.verify(wire.sender, wire.body.encode(), bytes.fromhex(wire.sig))
    try:
        record = cls.model_validate_json(wire.body)
    except ValidationError as exc:
        raise ProtocolError(f"invalid {cls.__name__}: {first_error(exc)}") from None
    if record.sender != wire.sender:
        raise ProtocolError(f"{cls.__name__} body names sender {record.sender!r}, its wrapper {wire.sender!r}")
    if record.federation != federation:
        raise ProtocolError(f"{cls.__name__} for federation {record.federation!r}, not {federation!r}")
    return record
