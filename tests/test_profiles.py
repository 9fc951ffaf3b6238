"""Profile schema, loader and `fedge profiles list|show`: every shipped profile loads, and a
malformed file is reported field by field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from device_profiles import Profile, ProfileError, ProfileNotFoundError, load_profile, load_profile_file, resolve_profile_path, shipped_names
from device_profiles.loader import SHIPPED_DIR
from fedge.cli.profiles import app
from fedge.protocol.chunks import DEFAULT_CHUNK_SIZE

REQUIRED = {
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb",
    "jetson-agx-xavier-32gb",
    "rtx-4090-workstation",
    "cpu-console",
}
FIGURE_KEYS = re.compile(
    r"^\s+(gpu_arch|compute_capability|fp32_tflops|fp16_tflops|int8_tops|memory_gb|memory_bandwidth_gbs|"
    r"power_modes|cpu_cores|uplink_mbps|downlink_mbps|rtt_ms|loss):"
)


def _valid_data() -> dict:
    return yaml.safe_load((SHIPPED_DIR / "jetson-orin-nano-8gb.yaml").read_text())


def _write(tmp_path: Path, data: object, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_the_issue_profiles_ship() -> None:
    assert REQUIRED <= set(shipped_names())


@pytest.mark.parametrize("name", shipped_names())
def test_shipped_profile_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)

    reloaded = load_profile_file(_write(tmp_path, profile.model_dump(mode="json")))

    assert profile.name == name
    assert reloaded == profile
    assert Profile.model_validate_json(profile.model_dump_json()) == profile


@pytest.mark.parametrize("name", shipped_names())
def test_every_figure_has_a_source_or_a_reason_for_null(name: str) -> None:
    lines = (SHIPPED_DIR / f"{name}.yaml").read_text().splitlines()
    checked = 0
    for i, line in enumerate(lines):
        if not FIGURE_KEYS.match(line):
            continue
        value, _, comment = line.partition("#")
        block = []  # the contiguous comment lines right above the figure
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j])
            j -= 1
        context = comment + " ".join(block)
        checked += 1

        assert context.strip(), f"{name}: figure without a comment: {line.strip()}"
        if value.split(":", 1)[1].strip() not in ("null", "[]"):
            assert "http" in context or "above" in comment, f"{name}: figure without a source URL: {line.strip()}"

    assert checked == 13


def test_chunk_size_defaults_to_256_kib(tmp_path: Path) -> None:
    data = _valid_data()
    del data["defaults"]["chunk_size"]

    profile = load_profile_file(_write(tmp_path, data))

    assert profile.defaults.chunk_size == DEFAULT_CHUNK_SIZE == 262144


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("device", "memory_gb", "lots", r"device\.memory_gb: Input should be a valid number.*'lots'"),
        ("device", "kind", "fpga", r"device\.kind: Input should be 'jetson', 'gpu' or 'cpu'"),
        ("device", "memroy_gb", 8, r"device\.memroy_gb: unknown field; valid fields here: .*memory_gb"),
        ("device", "compute_capability", "sm_87", r"device\.compute_capability: String should match pattern"),
        ("link", "loss", 1.5, r"link\.loss: Input should be less than 1 \(got 1\.5\)"),
        ("link", "uplink_mbps", -10, r"link\.uplink_mbps: Input should be greater than 0"),
        ("defaults", "training_mode", "dense", r"defaults\.training_mode: Input should be 'full', 'lora', 'pruned' or 'qat'"),
        ("defaults", "codec", "topk:0.01,ef||zstd", r"defaults\.codec: empty stage in codec spec 'topk:0\.01,ef\|\|zstd'"),
        ("defaults", "codec", "q8|lzma", r"defaults\.codec: unknown stage 'lzma' .*valid stages: .*zstd"),
        ("defaults", "chunk_size", 10, r"defaults\.chunk_size: Input should be greater than or equal to 1024"),
    ],
)
def test_malformed_field_is_named_with_its_problem(tmp_path: Path, section: str, key: str, value: object, expected: str) -> None:
    data = _valid_data()
    data[section][key] = value
    path = _write(tmp_path, data)

    with pytest.raises(ProfileError) as caught:
        load_profile_file(path)

    assert str(path) in str(caught.value)
    assert re.search(expected, str(caught.value)), str(caught.value)


def test_precision_must_fit_the_export_format(tmp_path: Path) -> None:
    data = _valid_data()
    data["defaults"].update(export_format="onnx-int8", export_precision="fp16")

    with pytest.raises(ProfileError, match=r"defaults: .*export_precision fp16 does not fit export_format onnx-int8; use one of int8"):
        load_profile_file(_write(tmp_path, data))


def test_tensorrt_on_a_cpu_device_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load((SHIPPED_DIR / "cpu-console.yaml").read_text())
    data["defaults"].update(export_format="tensorrt", export_precision="fp16")

    with pytest.raises(ProfileError, match=r"export_format tensorrt needs a GPU, but device.kind is cpu"):
        load_profile_file(_write(tmp_path, data))


def test_missing_section_and_wrong_version_are_named(tmp_path: Path) -> None:
    data = _valid_data()
    del data["link"]
    data["schema_version"] = 2

    with pytest.raises(ProfileError) as caught:
        load_profile_file(_write(tmp_path, data))

    assert "2 problem(s)" in str(caught.value)
    assert "link: Field required" in str(caught.value)
    assert "schema_version: Input should be 1" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("device: [unclosed", "not valid YAML"), ("- just\n- a list\n", "a profile is a YAML mapping")],
)
def test_unparseable_files_are_reported(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ProfileError, match=expected):
        load_profile_file(_write(tmp_path, text))


def test_names_and_paths_resolve_differently(tmp_path: Path) -> None:
    user = _write(tmp_path, _valid_data(), "cpu-console.yaml")

    assert resolve_profile_path("cpu-console") == SHIPPED_DIR / "cpu-console.yaml"
    assert resolve_profile_path(str(user)) == user
    with pytest.raises(ProfileError, match="no shipped profile named 'jetson-nano'; known: cpu-console"):
        load_profile("jetson-nano")
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(tmp_path / "absent.yaml")


def test_cli_list_shows_every_shipped_profile() -> None:
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})

    assert result.exit_code == 0, result.output
    for name in shipped_names():
        assert name in result.output


@pytest.mark.parametrize("columns", ["80", "100"])
def test_cli_list_in_a_narrow_or_piped_terminal_shows_every_name_whole(columns: str) -> None:
    # CliRunner's output is not a terminal, like `fedge profiles list | cat`.
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": columns})

    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert set(shipped_names()) <= set(rows)
    assert "tensorrt int8" in rows["jetson-orin-nano-8gb"] and "lora" in rows["jetson-orin-nano-8gb"]
    assert max(len(line) for line in result.output.splitlines()) <= int(columns)


def test_cli_show_of_a_missing_profile_exits_3() -> None:
    result = CliRunner().invoke(app, ["show", "jetson-nano"])

    assert result.exit_code == ProfileNotFoundError.exit_code == 3
    assert "no shipped profile named 'jetson-nano'" in result.output


def test_cli_show_accepts_a_user_profile_path(tmp_path: Path) -> None:
    data = _valid_data()
    data.update(name="st-marys-ct")
    data["link"]["uplink_mbps"] = 3.5
    path = _write(tmp_path, data)

    result = CliRunner().invoke(app, ["show", str(path)])

    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["name"] == "st-marys-ct"
    assert shown["link"]["uplink_mbps"] == 3.5


def test_cli_show_source_keeps_the_source_comments() -> None:
    result = CliRunner().invoke(app, ["show", "jetson-agx-orin-64gb", "--format", "source"])

    assert result.exit_code == 0, result.output
    assert "https://developer.nvidia.com/cuda-gpus" in result.output


def test_cli_show_table_lists_fields() -> None:
    result = CliRunner().invoke(app, ["show", "rtx-4090-workstation", "--format", "table"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    assert "device.memory_bandwidth_gbs" in result.output
    assert "1008.0" in result.output


def test_cli_show_malformed_file_names_the_field_and_exits_2(tmp_path: Path) -> None:
    data = _valid_data()
    data["defaults"]["batch_size"] = 0
    path = _write(tmp_path, data)

    result = CliRunner().invoke(app, ["show", str(path)])

    assert result.exit_code == ProfileError.exit_code == 2
    assert "defaults.batch_size: Input should be greater than or equal to 1 (got 0)" in result.output


def test_profile_export_formats_and_precisions_are_the_exporters_own() -> None:
    from typing import get_args

    from device_profiles.schema import EXPORT_PRECISIONS, ExportFormat
    from exporters import EXPORTERS
    from fedge.cli.export import Format

    assert set(get_args(ExportFormat)) == set(EXPORT_PRECISIONS) <= set(EXPORTERS.names())
    assert all(EXPORTERS.get(fmt).precisions == precisions for fmt, precisions in EXPORT_PRECISIONS.items())
    assert tuple(f.value for f in Format) == EXPORTERS.names()
