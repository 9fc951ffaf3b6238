"""benchmarks/fuzz.py: a seeded slice of the campaign (every decoder and both handlers) finds
nothing; cases replay alone; mutators are pure functions of their seed; the report has its schema."""

from __future__ import annotations

import json
import random
import sys

import pytest
from model_fixtures import BENCHMARKS, load_benchmark

sys.path.insert(0, str(BENCHMARKS))
from fuzzlib.mutate import Raw, mutate_bytes, mutate_json, to_json  # noqa: E402

SLICE = 2000


@pytest.fixture(scope="module")
def fuzz():
    return load_benchmark("fuzz")


@pytest.fixture(scope="module")
def report(fuzz, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("fuzz") / "report.json"
    assert fuzz.main(["--report", str(path), "--cases", str(SLICE), "--seed", "18"]) == 0
    return json.loads(path.read_text())


@pytest.mark.integration
def test_a_seeded_slice_finds_no_unexpected_exception_escape_slow_or_bloated_case(report: dict) -> None:
    assert report["cases"] == SLICE and sum(t["cases"] for t in report["targets"].values()) == SLICE
    assert len(report["targets"]) == 10 and all(t["cases"] > 0 for t in report["targets"].values()), report["targets"]
    assert report["totals"] == {k: 0 for k in report["totals"]}, (report["totals"], report["unexpected"][:3], report["memory"][:3], report["slow"][:3])
    for name, stats in report["targets"].items():
        assert {"cases", "accepted", "rejected", "unexpected", "max_ms", "max_traced_mb"} <= set(stats), name
        assert stats["accepted"] + stats["rejected"] + stats["unexpected"] == stats["cases"], name


def test_a_case_replays_alone_from_its_seed_and_index(fuzz, tmp_path) -> None:
    targets = fuzz.build_targets(tmp_path)
    first = fuzz.case_for(targets, 18, 41)
    again = fuzz.case_for(fuzz.build_targets(tmp_path / "again"), 18, 41)
    assert first[0].name == again[0].name and first[1] == again[1]


def test_mutators_are_pure_functions_of_their_seed() -> None:
    value = {"a": [1, 2, {"b": "c"}], "d": None}
    assert mutate_json(random.Random(3), value) == mutate_json(random.Random(3), value)
    assert mutate_bytes(random.Random(3), b"FDG1" * 10) == mutate_bytes(random.Random(3), b"FDG1" * 10)
    assert to_json({"x": Raw("NaN"), "y": [Raw("[" * 3 + "]" * 3)]}) == b'{"x":NaN,"y":[[[[]]]]}'
    assert all(len(mutate_json(random.Random(i), [value] * 50, budget=4096)) <= 4096 + 64 for i in range(200))
