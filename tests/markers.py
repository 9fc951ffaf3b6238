"""Test tiers (a pytest plugin: see conftest.py). `integration`: starts a broker, a subprocess, a
real federation or storescu, trains more than a few steps, or exports through torch.onnx and
onnxruntime end to end. Everything else is `unit`, marked here so `-m unit` and
`-m "not integration"` (`make test-fast`) select the same tests. A `mosquitto` test needs a
broker process, so it is integration too."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("mosquitto") is not None and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)
