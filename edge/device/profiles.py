"""Device profiles from hw-profiles/*.yaml (installed with the package; the repository's top-level
hw-profiles/ links here): published numbers, each with its source.

A profile file is data, validated by a strict schema: every field is ``{value, source}`` (or a
``derivation`` from sourced numbers), and ``value: unknown`` where nobody published the number —
never a guess. A malformed file is a one-line error naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from edge.errors import EdgeError, field_error
from edge.hardware import HardwareProfile

UNKNOWN = "unknown"
NONE = "none"  # the device has no such part (e.g. no NPU), as its source says


# edge's execution-provider names -> ONNX Runtime's (edge.runtime.ort.PROVIDERS; not imported from the runtime
# here so reading a device file stays free of onnxruntime)
EP_PROVIDERS = {"cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider", "qnn": "QNNExecutionProvider",
                "coreml": "CoreMLExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def profiles_dir() -> Path:
    """The device profiles installed with edge (package data of edge.device)."""
    return Path(__file__).resolve().parent / "hw-profiles"


class Sourced(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: Any
    source: str | None = None
    derivation: str | None = None
    detail: str | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _has_source(self) -> "Sourced":
        if self.value != UNKNOWN and not (self.source or self.derivation):
            raise ValueError("a known value needs a source (URL or measurement) or a derivation")
        return self

    @property
    def known(self) -> bool:
        return self.value not in (UNKNOWN, NONE)


def _positive(kind: type):
    def check(v: Sourced) -> Sourced:
        if v.known and (not isinstance(v.value, (int, float)) or isinstance(v.value, bool) or v.value <= 0
                        or (kind is int and not isinstance(v.value, int))):
            raise ValueError(f"value must be a positive {kind.__name__}, '{UNKNOWN}' or '{NONE}', got {v.value!r}")
        return v

    return check


class DeviceFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: str
    soc: Sourced
    cpu_cores: Sourced
    isa_features: Sourced
    ram_bytes: Sourced
    memory_bandwidth_gbps: Sourced
    storage_read_mbps: Sourced
    cpu_gflops_fp32: Sourced
    gpu: Sourced
    accelerator_tops_int8: Sourced
    # ONNX Runtime execution providers that run on this device, by edge's names (edge.runtime.ort
    # PROVIDERS: cpu, xnnpack, qnn, coreml, openvino), each sourced from ONNX Runtime's docs
    execution_providers: Sourced

    _ram = field_validator("ram_bytes")(_positive(int))
    _cores = field_validator("cpu_cores")(_positive(int))
    _bw = field_validator("memory_bandwidth_gbps")(_positive(float))
    _storage = field_validator("storage_read_mbps")(_positive(float))
    _gflops = field_validator("cpu_gflops_fp32")(_positive(float))
    _tops = field_validator("accelerator_tops_int8")(_positive(float))

    @field_validator("execution_providers")
    @classmethod
    def _eps(cls, v: Sourced) -> Sourced:
        known = ("cpu", "xnnpack", "qnn", "coreml", "openvino")
        if v.known and not (isinstance(v.value, list) and v.value and all(x in known for x in v.value)):
            raise ValueError(f"must be a non-empty list of {', '.join(known)}")
        return v

    @field_validator("isa_features")
    @classmethod
    def _isa(cls, v: Sourced) -> Sourced:
        if v.known and not (isinstance(v.value, list) and all(isinstance(x, str) for x in v.value)):
            raise ValueError(f"value must be a list of feature names or '{UNKNOWN}'")
        return v

    def to_profile(self, file: Path) -> HardwareProfile:
        val = lambda f: f.value if f.known else None  # noqa: E731
        if not self.ram_bytes.known:
            raise EdgeError(f"{file.name}: ram_bytes is unknown; a device profile needs its RAM to plan")
        cores = val(self.cpu_cores) or 1
        return HardwareProfile(
            name=self.name, source=f"hw-profiles/{file.name}", measured_unix=None,
            cpu_model=str(val(self.soc) or UNKNOWN), cores_physical=cores, cores_logical=cores,
            isa=tuple(val(self.isa_features) or ()), ram_total_bytes=int(self.ram_bytes.value),
            ram_available_bytes=None, cgroup_limit_bytes=None,
            memory_bandwidth_gbps=val(self.memory_bandwidth_gbps),
            storage_seq_read_mbps=val(self.storage_read_mbps), storage_buffered_read_mbps=None,
            storage_rand_read_mbps=None, storage_chunk_read_mbps=None, storage_chunk_latency_ms=None,
            storage_path=None,
            gemv_q4_gflops=None, gemv_q8_gflops=None, ggml_call_us=None, convert_mbps=None, llama_layer_us=None,
            offload_layer_us=None,
            gpu=None if not self.gpu.known else str(self.gpu.value),
            ort_providers=tuple(EP_PROVIDERS[e] for e in (val(self.execution_providers) or ())), llama_rpc=False)


def load_device_file(path: Path) -> DeviceFile:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EdgeError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EdgeError(f"{path.name}: a device profile must be a YAML mapping")
    try:
        return DeviceFile.model_validate(data)
    except ValidationError as e:
        raise EdgeError(field_error(path.name, e)) from None


def device_names(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (directory or profiles_dir()).glob("*.yaml"))


def device_profile(name: str, directory: Path | None = None) -> HardwareProfile:
    """The profile named ``name`` (file stem in hw-profiles/, or a path to a YAML file)."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = (directory or profiles_dir()) / f"{name}.yaml"
    if not path.is_file():
        raise EdgeError(f"no device profile '{name}'; known: {', '.join(device_names(directory)) or 'none'}")
    return load_device_file(path).to_profile(path)
