"""One home for the round protocol: what a site sends, what the server sends back, and the checks
between them. The agent, the server, `fedge bench` and the benchmarks all call these."""

from fedge.rounds.codecs import FULL_MODEL_CODEC, codec_for
from fedge.rounds.global_model import GlobalPayload, make_global, read_global
from fedge.rounds.manifest import Manifest
from fedge.rounds.update import (
    Expected,
    RejectedUpdate,
    Update,
    make_update,
    read_update,
    validate_header,
)

__all__ = [
    "FULL_MODEL_CODEC",
    "Expected",
    "GlobalPayload",
    "Manifest",
    "RejectedUpdate",
    "Update",
    "codec_for",
    "make_global",
    "make_update",
    "read_global",
    "read_update",
    "validate_header",
]
