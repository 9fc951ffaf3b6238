"""Wire protocol: envelopes, signatures, chunking and topics, including hostile input."""

from __future__ import annotations

import json
import random
import struct

import pytest

from fedge.protocol import (
    Chunk,
    EnvelopeHeader,
    ProtocolError,
    Reassembler,
    Topics,
    decode_envelope,
    encode_envelope,
    split_chunks,
)
from fedge.protocol.signing import Signer, Verifier


def _header(**kw) -> EnvelopeHeader:
    base = dict(kind="update", federation="fed", round=3, sender="site-1", codec="fp32", manifest=({"name": "w", "shape": [2, 2]},), num_samples=10)
    return EnvelopeHeader(**(base | kw))


def test_envelope_round_trip_and_hash():
    data = encode_envelope(_header(), b"payload-bytes")
    env = decode_envelope(data)
    assert env.payload == b"payload-bytes"
    assert env.header.round == 3 and env.header.manifest[0].shape == (2, 2)
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(ProtocolError, match="SHA-256"):
        decode_envelope(tampered)


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -1])
def test_truncated_envelopes_are_rejected(cut):
    data = encode_envelope(_header(), b"x" * 100)
    with pytest.raises(ProtocolError):
        decode_envelope(data[:cut])


def test_header_length_is_checked_before_reading():
    with pytest.raises(ProtocolError, match="header length"):
        decode_envelope(b"FDG1" + struct.pack(">I", 2**31) + b"{}")


def test_header_is_an_allow_list():
    with pytest.raises(ValueError, match="allow-list"):
        _header(metrics={"PatientName": 1.0})
    raw = encode_envelope(_header(), b"")
    head_len = struct.unpack(">I", raw[4:8])[0]
    head = json.loads(raw[8 : 8 + head_len])
    head["institution"] = "General Hospital"
    forged = json.dumps(head).encode()
    with pytest.raises(ProtocolError, match="invalid header"):
        decode_envelope(b"FDG1" + struct.pack(">I", len(forged)) + forged)


def test_signatures():
    signer = Signer.generate()
    verifier = Verifier.from_pems({"site-1": signer.public_pem()})
    data = encode_envelope(_header(), b"abc", signer)
    assert decode_envelope(data, verifier).payload == b"abc"
    with pytest.raises(ProtocolError, match="unsigned"):
        decode_envelope(encode_envelope(_header(), b"abc"), verifier)
    other = encode_envelope(_header(), b"abc", Signer.generate())
    with pytest.raises(ProtocolError, match="bad signature"):
        decode_envelope(other, verifier)
    with pytest.raises(ProtocolError, match="no public key"):
        decode_envelope(encode_envelope(_header(sender="site-2"), b"abc", signer), verifier)


def test_chunks_reassemble_out_of_order_with_duplicates():
    data = bytes(random.Random(0).getrandbits(8) for _ in range(10_000))
    chunks = split_chunks(data, chunk_size=1000)
    assert len(chunks) == 10
    wire = [c.encode() for c in chunks] + [chunks[3].encode(), chunks[7].encode()]
    random.Random(1).shuffle(wire)
    asm = Reassembler()
    results = [asm.add("k", Chunk.decode(raw)) for raw in wire]
    done = [r for r in results if r is not None]
    assert done == [data]
    assert asm.open_transfers == 0


def test_chunk_bounds():
    with pytest.raises(ProtocolError, match="shorter"):
        Chunk.decode(b"FCK1")
    good = split_chunks(b"abcdef", 2)[0]
    with pytest.raises(ProtocolError, match="out of range"):
        Chunk.decode(Chunk(good.transfer, 5, 3, 6, b"ab").encode())
    asm = Reassembler(max_bytes=1000)
    with pytest.raises(ProtocolError, match="limit"):
        asm.add("k", Chunk(good.transfer, 0, 2, 10**9, b"ab"))
    with pytest.raises(ProtocolError, match="chunks for"):
        asm.add("k", Chunk(good.transfer, 0, 500, 10, b"ab"))
    with pytest.raises(ProtocolError, match="exceed"):
        asm.add("k", Chunk(good.transfer, 0, 2, 3, b"abcd"))
    asm.add("k", Chunk(good.transfer, 0, 2, 4, b"ab"))
    with pytest.raises(ProtocolError, match="disagrees"):
        asm.add("k", Chunk(good.transfer, 1, 3, 4, b"cd"))


def test_open_transfers_are_bounded():
    asm = Reassembler(max_open=4)
    for i in range(50):
        asm.add("k", Chunk(i.to_bytes(16, "big"), 0, 2, 4, b"ab"))
    assert asm.open_transfers == 4


def test_topics_parse_strictly():
    t = Topics("fed")
    assert t.parse(t.update_chunk(4, "site-1", 2)).chunk == 2
    assert t.parse(t.announce(7)).kind == "announce"
    for bad in ["fedge/other/round/1/update/a/0", "fedge/fed/round/x/update/a/0", "fedge/fed/round/1/update/a/b/c", "fedge/fed/nope"]:
        with pytest.raises(ValueError):
            t.parse(bad)
    with pytest.raises(ValueError):
        Topics("bad/name")
