"""The wire protocol both sides speak over MQTT: topics, signed envelopes, chunks. No torch here."""

from fedge.protocol.chunks import Chunk, Reassembler, split_chunks
from fedge.protocol.envelope import (
    ALLOWED_METRICS,
    Envelope,
    EnvelopeHeader,
    ProtocolError,
    TensorEntry,
    decode_envelope,
    encode_envelope,
)
from fedge.protocol.messages import (
    LOCAL_OPTIMIZERS,
    MODE_NAMES,
    ControlMessage,
    RoundAnnouncement,
    SnapshotAnnouncement,
    StatusMessage,
    TrainSettings,
    TransferInfo,
    open_record,
    sign_record,
)
from fedge.protocol.topics import TopicInfo, Topics

__all__ = [
    "ALLOWED_METRICS",
    "Chunk",
    "ControlMessage",
    "LOCAL_OPTIMIZERS",
    "MODE_NAMES",
    "Envelope",
    "EnvelopeHeader",
    "ProtocolError",
    "Reassembler",
    "RoundAnnouncement",
    "SnapshotAnnouncement",
    "StatusMessage",
    "TensorEntry",
    "TrainSettings",
    "Topics",
    "TopicInfo",
    "TransferInfo",
    "decode_envelope",
    "encode_envelope",
    "open_record",
    "sign_record",
    "split_chunks",
]
