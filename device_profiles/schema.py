"""The device profile schema: what a device is (spec sheet), how its site link behaves, and the
defaults an agent on it starts from.

Every hardware figure is optional because a shipped profile may only hold figures with a cited
source (see ../shared/reference/device_specs.md); a missing figure is `null`, never a guess.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compression.codecs import CodecSpecError, UpdateCodec
from fedge.precision import Precision
from fedge.protocol.chunks import DEFAULT_CHUNK_SIZE
from fedge.protocol.messages import ModeName

SCHEMA_VERSION: Literal[1] = 1
# MQTT's largest packet (remaining length field) bounds one chunk.
MAX_CHUNK_SIZE = 268_435_455

DeviceKind = Literal["jetson", "gpu", "cpu"]
ExportFormat = Literal["onnx", "onnx-int8", "tensorrt"]
# What each exporter writes (exporters.EXPORTERS, which imports torch: tests keep the two equal).
EXPORT_PRECISIONS: dict[str, tuple[Precision, ...]] = {"onnx": ("fp32", "fp16"), "onnx-int8": ("int8",), "tensorrt": ("fp32", "fp16", "int8")}
# Which Device field holds the peak for each precision.
PEAK_FIELDS: dict[str, str] = {"fp32": "fp32_tflops", "fp16": "fp16_tflops", "int8": "int8_tops"}

_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class _Strict(BaseModel):
    """Frozen, and unknown keys are errors: a typo in a profile must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Device(_Strict):
    """Spec-sheet figures. Peaks are theoretical (dense, GPU only), never measurements."""

    name: str = Field(min_length=1, description="human-readable device name")
    kind: DeviceKind
    gpu_arch: str | None = Field(default=None, description="GPU architecture, e.g. ampere, volta, ada")
    compute_capability: str | None = Field(default=None, pattern=r"^\d+\.\d+$", description='CUDA compute capability, e.g. "8.7"')
    fp32_tflops: float | None = Field(default=None, gt=0, description="peak FP32 (CUDA cores)")
    fp16_tflops: float | None = Field(default=None, gt=0, description="peak dense FP16 tensor throughput")
    int8_tops: float | None = Field(default=None, gt=0, description="peak dense INT8 tensor throughput, GPU only")
    memory_gb: float | None = Field(default=None, gt=0, description="device memory (unified with the CPU on Jetson)")
    memory_bandwidth_gbs: float | None = Field(default=None, gt=0)
    power_modes: list[str] = Field(default_factory=list, description="vendor power modes or board power limits")
    cpu_cores: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _gpu_fields_match_kind(self) -> "Device":
        if self.kind == "cpu" and (self.gpu_arch is not None or self.compute_capability is not None):
            raise ValueError("a kind: cpu device has no gpu_arch or compute_capability; set them to null or change kind")
        if self.kind != "cpu" and self.compute_capability is None:
            raise ValueError(f'a kind: {self.kind} device needs compute_capability (e.g. "8.7")')
        return self

    def peak_ops_per_s(self, precision: Precision) -> float | None:
        """Peak operations per second at `precision`, or None when the profile has no such figure."""
        tera: float | None = getattr(self, PEAK_FIELDS[precision])
        return None if tera is None else tera * 1e12


class Link(_Strict):
    """The site's network link; `null` means no sourced figure (emulation leaves that direction unthrottled)."""

    uplink_mbps: float | None = Field(default=None, gt=0)
    downlink_mbps: float | None = Field(default=None, gt=0)
    rtt_ms: float | None = Field(default=None, ge=0)
    loss: float | None = Field(default=None, ge=0, lt=1, description="packet loss fraction, 0 <= loss < 1")


class Defaults(_Strict):
    """What an agent on this device starts from; every value can be overridden in the agent config."""

    training_mode: ModeName
    codec: str = Field(description='codec spec string, e.g. "topk:0.01,ef|q8|zstd:3"')
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024, le=MAX_CHUNK_SIZE, description="bytes per MQTT chunk")
    batch_size: int = Field(ge=1)
    export_format: ExportFormat
    export_precision: Precision

    @field_validator("codec")
    @classmethod
    def _codec_parses(cls, value: str) -> str:
        # The codec's own parser, so a profile accepts exactly the specs an agent can run.
        try:
            UpdateCodec.from_spec(value)
        except CodecSpecError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _precision_fits_format(self) -> "Defaults":
        allowed = EXPORT_PRECISIONS[self.export_format]
        if self.export_precision not in allowed:
            raise ValueError(f"export_precision {self.export_precision} does not fit export_format {self.export_format}; use one of {', '.join(allowed)}")
        return self


class Profile(_Strict):
    """One device class: spec sheet, site link and agent defaults."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(description="profile id, lowercase with dashes (the file name of a shipped profile)")
    description: str = ""
    device: Device
    link: Link
    defaults: Defaults

    @field_validator("name")
    @classmethod
    def _name_syntax(cls, value: str) -> str:
        if not _PROFILE_NAME.match(value):
            raise ValueError(f"profile name {value!r} must be lowercase letters, digits and dashes")
        return value

    @model_validator(mode="after")
    def _tensorrt_needs_gpu(self) -> "Profile":
        if self.defaults.export_format == "tensorrt" and self.device.kind == "cpu":
            raise ValueError("defaults.export_format tensorrt needs a GPU, but device.kind is cpu; use onnx or onnx-int8")
        return self
