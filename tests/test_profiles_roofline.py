"""Roofline estimate on the default model: exact FLOP count, latency = max(compute, memory), labelled."""

from __future__ import annotations

import pytest

from device_profiles import load_profile
from device_profiles.roofline import count_flops_and_bytes, estimate_latency
from fedge.models import ModelConfig, build_model

# SmallCNN(1 -> 32 -> 64 -> 128, 3x3 convs, pools after the first two) on 28x28, plus a 128 -> 2 head;
# 2 FLOPs per multiply-add.
CNN_FLOPS_PER_IMAGE = 2 * (28 * 28 * 32 * 9 * 1 + 14 * 14 * 64 * 9 * 32 + 7 * 7 * 128 * 9 * 64 + 128 * 2)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig())


def test_flops_match_the_hand_count_and_scale_with_batch(model) -> None:
    flops_1, bytes_1 = count_flops_and_bytes(model, (1, 1, 28, 28), "fp32")
    flops_8, bytes_8 = count_flops_and_bytes(model, (8, 1, 28, 28), "fp32")

    assert flops_1 == CNN_FLOPS_PER_IMAGE
    assert flops_8 == 8 * CNN_FLOPS_PER_IMAGE
    params_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert bytes_1 > params_bytes
    assert bytes_8 - params_bytes == pytest.approx(8 * (bytes_1 - params_bytes))


def test_bytes_follow_precision(model) -> None:
    _, fp32 = count_flops_and_bytes(model, (2, 1, 28, 28), "fp32")
    _, fp16 = count_flops_and_bytes(model, (2, 1, 28, 28), "fp16")
    _, int8 = count_flops_and_bytes(model, (2, 1, 28, 28), "int8")

    assert fp32 == 2 * fp16 == 4 * int8


@pytest.mark.parametrize("name", ["jetson-orin-nano-8gb", "jetson-agx-xavier-32gb", "rtx-4090-workstation"])
def test_estimate_is_the_roofline_of_the_profile(model, name: str) -> None:
    profile = load_profile(name)

    est = estimate_latency(model, (32, 1, 28, 28), profile, "fp16")

    assert est["kind"] == "estimate"
    assert est["flops"] == 32 * CNN_FLOPS_PER_IMAGE
    assert est["compute_ms"] == pytest.approx(est["flops"] / (profile.device.fp16_tflops * 1e12) * 1e3)
    assert est["memory_ms"] == pytest.approx(est["bytes"] / (profile.device.memory_bandwidth_gbs * 1e9) * 1e3)
    assert est["latency_ms"] == max(est["compute_ms"], est["memory_ms"])
    assert est["bound"] == ("compute" if est["compute_ms"] >= est["memory_ms"] else "memory")
    assert est["missing"] == []


def test_default_precision_is_the_profiles_export_precision(model) -> None:
    est = estimate_latency(model, (1, 1, 28, 28), load_profile("jetson-orin-nano-8gb"))

    assert est["precision"] == "int8"
    assert est["peak_ops_per_s"] == pytest.approx(33.4e12)


def test_missing_figures_give_no_latency_and_name_the_fields(model) -> None:
    model.train()

    est = estimate_latency(model, (1, 1, 28, 28), load_profile("cpu-console"), "fp32")

    assert est["kind"] == "estimate"
    assert est["latency_ms"] is None and est["bound"] is None
    assert est["missing"] == ["device.fp32_tflops", "device.memory_bandwidth_gbs"]
    assert est["flops"] == CNN_FLOPS_PER_IMAGE
    assert model.training, "the estimate must leave the model's train/eval mode as it found it"
