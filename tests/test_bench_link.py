"""Issue 6 acceptance: with a 10 Mbit/s emulated uplink, an agent's dense update published through
`fedge.transport.MqttSession` to a real Mosquitto arrives in bytes/bandwidth, within 15%."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from compression import UpdateCodec
from fedge import weights as W
from fedge.data import ImageSplits
from fedge.linkemu import LinkEmulator
from fedge.models import ModelConfig, build_model
from fedge.protocol import Chunk, Reassembler, Topics, decode_envelope, split_chunks
from fedge.rounds import make_update
from fedge.tasks import ClassificationTask
from fedge.transport import MqttSession

UPLINK_MBPS = 10.0
CHUNK_SIZE = 256 * 1024
TOLERANCE = 0.15
# ~650k parameters: a 2.6 MB dense fp32 update, about 2 s on a 10 Mbit/s link.
CONFIG = ModelConfig(arch="cnn", in_channels=1, num_classes=2, image_size=28, options={"widths": [64, 160, 384]})


def _dense_update() -> tuple[bytes, dict[str, np.ndarray]]:
    """What the agent sends after a local step: the delta, fp32 (dense, lossless), in a signed-less envelope."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, size=(16, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(16) % 2,
        "test_images": rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(4) % 2,
    }
    task = ClassificationTask(ImageSplits.from_arrays(arrays, "synthetic"))
    torch.manual_seed(0)
    model = build_model(CONFIG)
    before = W.float_state(model)
    result = task.train_local(model, batch_size=8)
    delta = W.subtract(W.float_state(model), before)
    envelope = make_update(delta, codec="fp32", federation="linktest", site="site-a", round=1, run=None, model_sha256=None,
                           num_samples=result.num_samples, metrics={})  # fmt: skip
    return envelope, delta


@pytest.mark.mosquitto
def test_emulated_10mbit_uplink_of_a_dense_update_matches_bytes_over_bandwidth(mosquitto_broker: tuple[str, int]) -> None:  # noqa: F811
    host, port = mosquitto_broker
    url = f"mqtt://{host}:{port}"
    topics = Topics("linktest")
    envelope, delta = _dense_update()
    wire_bytes = sum(len(c.encode()) for c in split_chunks(envelope, CHUNK_SIZE))  # what the uplink bucket is charged
    (projected, _) = LinkEmulator(UPLINK_MBPS, None).projected_seconds(wire_bytes, 0)
    server = MqttSession(url, "linktest-server", clean_session=True).connect(timeout=10)
    agent = MqttSession(url, "linktest-site-a", clean_session=True, link=LinkEmulator(UPLINK_MBPS, None)).connect(timeout=10)
    try:
        server.subscribe(topics.all_updates)
        time.sleep(0.3)  # let the SUBACK arrive before the first chunk
        reassembler = Reassembler()
        received = None

        start = time.monotonic()
        agent.publish_chunked(lambda i: topics.update_chunk(1, "site-a", i), envelope, chunk_size=CHUNK_SIZE)
        while received is None and time.monotonic() - start < 30:
            msg = server.get(timeout=1)
            if msg is not None:
                received = reassembler.add("site-a", Chunk.decode(msg.payload))
        elapsed = time.monotonic() - start

        print(f"dense update {wire_bytes} B: {elapsed:.3f} s measured, {projected:.3f} s projected ({elapsed / projected - 1:+.1%})")
        assert received == envelope, "the update did not arrive intact"
        assert agent.bytes_sent == wire_bytes
        assert projected > 1.5, f"payload too small for a timing check: {wire_bytes} B"
        assert abs(elapsed / projected - 1) < TOLERANCE, f"upload took {elapsed:.3f}s, bytes/bandwidth is {projected:.3f}s"
        decoded = UpdateCodec.from_spec("fp32").decode(decode_envelope(received).payload, UpdateCodec.manifest(delta))
        assert all(np.array_equal(decoded[k], v) for k, v in delta.items())
    finally:
        agent.close()
        server.close()
