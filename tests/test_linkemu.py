"""Link emulation: the token bucket paces bytes to the configured rate, alone and through a real broker."""

from __future__ import annotations

import math
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from fedge.linkemu import LinkEmulator, TokenBucket

PAYLOAD_BYTES = 2_500_000
RATE_BITS_PER_S = 10e6  # a 10 Mbit/s profile uplink: 2.5 MB takes 2.0 s
CHUNK = 256 * 1024
TOLERANCE = 0.15  # the acceptance bound in issue 6


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def test_rejects_bad_rates_naming_the_field() -> None:
    with pytest.raises(ValueError, match="rate_bits_per_s"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="burst_bytes"):
        TokenBucket(1e6, burst_bytes=-1)
    with pytest.raises(ValueError, match="nbytes"):
        TokenBucket(1e6).reserve(-5)
    with pytest.raises(ValueError, match="downlink_mbps"):
        LinkEmulator(10, -1)


def test_burst_is_free_and_debt_is_charged_at_the_rate() -> None:
    bucket = TokenBucket(8_000, burst_bytes=1_000)  # 1000 bytes/s

    first = bucket.reserve(1_000)  # the full bucket covers it
    second = bucket.reserve(500)  # half a second of debt

    assert first == 0.0
    assert second == pytest.approx(0.5, abs=0.05)


def test_none_rate_leaves_direction_unthrottled() -> None:
    link = LinkEmulator(uplink_mbps=10, downlink_mbps=None)

    assert link.downlink.reserve(10**9) == 0.0
    assert link.uplink.reserve(10**6) > 0.5
    assert link.projected_seconds(2_500_000, 1) == (pytest.approx(2.0), None)
    assert math.isinf(link.downlink.rate_bits_per_s)


class VirtualTime:
    """A clock that sleeping moves on: the bucket's pacing, exactly and at once."""

    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_bucket_paces_a_dense_update_to_the_link_rate() -> None:
    """Back to back, chunks take the link's time, less the burst the full bucket starts with
    (the real-time check through a broker is test_emulated_upload_through_mosquitto_matches_projection)."""
    clock = VirtualTime()
    bucket = TokenBucket(RATE_BITS_PER_S, now=clock.now, sleep=clock.sleep)
    slept = sum(bucket.consume(n) for n in _chunks(PAYLOAD_BYTES, CHUNK))
    expected = (PAYLOAD_BYTES - bucket.burst_bytes) * 8 / RATE_BITS_PER_S
    assert slept == pytest.approx(expected, rel=1e-9) and clock.t - 100.0 == pytest.approx(expected, rel=1e-9)
    clock.sleep(1.0)  # an idle second refills the bucket to its burst, never beyond
    assert bucket.consume(bucket.burst_bytes) == 0.0 and bucket.consume(1000) == pytest.approx(1000 * 8 / RATE_BITS_PER_S)


def test_concurrent_consumers_share_one_rate() -> None:
    bucket = TokenBucket(40e6)  # 4 threads x 312.5 kB at 40 Mbit/s: 0.5 s together
    per_thread = PAYLOAD_BYTES // 8
    expected = 4 * per_thread * 8 / 40e6

    def push() -> None:
        for n in _chunks(per_thread, 32 * 1024):
            bucket.consume(n)

    threads = [threading.Thread(target=push) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start

    assert abs(elapsed / expected - 1) < TOLERANCE, f"{elapsed:.3f}s vs projected {expected:.3f}s"


@pytest.mark.mosquitto
def test_emulated_upload_through_mosquitto_matches_projection(mosquitto_broker: tuple[str, int]) -> None:  # noqa: F811
    host, port = mosquitto_broker
    link = LinkEmulator(uplink_mbps=RATE_BITS_PER_S / 1e6, downlink_mbps=None)
    topic = "fedge/test/linkemu/update"
    received = {"bytes": 0}
    all_received = threading.Event()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        link.downlink.consume(len(msg.payload))
        received["bytes"] += len(msg.payload)
        if received["bytes"] >= PAYLOAD_BYTES:
            all_received.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="linkemu-sub", protocol=mqtt.MQTTv311)
    sub.on_message = on_message
    sub.on_subscribe = lambda *args: subscribed.set()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="linkemu-pub", protocol=mqtt.MQTTv311)
    sub.connect(host, port)
    pub.connect(host, port)
    sub.loop_start()
    pub.loop_start()
    try:
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(5), "subscription was not acknowledged"
        payload = bytes(range(256)) * (CHUNK // 256)
        expected = PAYLOAD_BYTES * 8 / RATE_BITS_PER_S

        start = time.monotonic()
        infos = []
        for n in _chunks(PAYLOAD_BYTES, CHUNK):
            link.uplink.consume(n)
            infos.append(pub.publish(topic, payload[:n], qos=1))
        for info in infos:
            info.wait_for_publish(timeout=10)
        assert all_received.wait(10), f"subscriber got {received['bytes']} of {PAYLOAD_BYTES} bytes"
        elapsed = time.monotonic() - start

        assert all(info.is_published() for info in infos)
        assert abs(elapsed / expected - 1) < TOLERANCE, f"upload {elapsed:.3f}s vs projected {expected:.3f}s"
    finally:
        pub.loop_stop()
        sub.loop_stop()
        pub.disconnect()
        sub.disconnect()
