"""The one registry helper every plugin family uses: duplicates refused, choices named."""

from __future__ import annotations

import pytest

from fedge.errors import UsageError
from fedge.registry import Registry, UnknownNameError


def test_register_lists_names_in_registration_order_and_gets_them() -> None:
    family: Registry[int] = Registry("widget")
    family.register("b")(2)
    family.register("a")(1)

    assert family.names() == ("b", "a") and list(family) == ["b", "a"] and len(family) == 2
    assert family.get("a") == 1 and "b" in family and "c" not in family
    assert list(family.items()) == [("b", 2), ("a", 1)] and list(family.values()) == [2, 1]


def test_a_second_plugin_under_a_taken_name_is_refused() -> None:
    family: Registry[object] = Registry("widget")
    family.register("a")(int)

    with pytest.raises(ValueError, match="widget 'a' is already registered by int"):
        family.register("a")(str)
    assert family.get("a") is int


def test_an_unknown_name_names_the_choices_and_is_a_usage_error() -> None:
    family: Registry[int] = Registry("widget")
    family.register("b")(2)
    family.register("a")(1)

    with pytest.raises(UnknownNameError, match=r"unknown widget 'c'; choose one of a, b") as err:
        family.get("c")
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2


def test_every_plugin_family_refuses_duplicates() -> None:
    from device_profiles.bench_backends import BACKENDS
    from exporters import EXPORTERS
    from fedge.models import MODELS
    from fedge.modes import MODES

    for family in (MODELS, MODES, EXPORTERS, BACKENDS):
        name = family.names()[0]
        with pytest.raises(ValueError, match="already registered"):
            family.register(name)(object())  # type: ignore[arg-type]


def test_training_modes_are_exactly_the_wire_protocol_mode_names() -> None:
    from fedge.modes import MODES, register_mode
    from fedge.protocol.messages import MODE_NAMES

    assert MODES.names() == MODE_NAMES
    with pytest.raises(ValueError, match="not in fedge.protocol.messages.ModeName"):
        register_mode("sparse")


def test_a_model_config_checks_its_fields_where_it_is_made() -> None:
    import numpy as np

    from fedge.models import ModelConfig

    assert ModelConfig("cnn", np.int64(3), 2, 28).in_channels == 3
    for bad, field in [({"arch": ""}, "arch"), ({"image_size": {"a": 1}}, "image_size"), ({"num_classes": 0}, "num_classes"),
                       ({"in_channels": True}, "in_channels"), ({"options": [1]}, "options")]:  # fmt: skip
        with pytest.raises(UsageError, match=f"model config field '{field}'"):
            ModelConfig(**{"arch": "cnn", **bad})  # type: ignore[arg-type]
