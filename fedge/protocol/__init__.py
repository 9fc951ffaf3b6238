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
from fedge.protocol.messages import RoundAnnouncement, SnapshotAnnouncement, StatusMessage, TransferInfo
from fedge.protocol.topics import Topics, TopicInfo

__all__ = [
    "ALLOWED_METRICS",
    "Chunk",
    "Envelope",
    "EnvelopeHeader",
    "ProtocolError",
    "Reassembler",
    "RoundAnnouncement",
    "SnapshotAnnouncement",
    "StatusMessage",
    "TensorEntry",
    "Topics",
    "TopicInfo",
    "TransferInfo",
    "decode_envelope",
    "encode_envelope",
    "split_chunks",
]
