"""HardwareProfile: what a device is, whether measured here (edge/device/profile.py) or read from a
sourced device profile (edge/device/profiles.py). A value type, like ModelSpec: the planner takes
it, the profiler produces it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import psutil


def spare_cpus() -> bool:
    """Whether the CPUs outnumber the threads a backend computes with by default (hyper-threads):
    only then can a background thread's work (the offload prefetcher's loads) overlap the compute.
    On a 2-core VM without them, prefetching cost 16-25% (docs/offload.md)."""
    return (psutil.cpu_count() or 1) > default_threads()


def default_threads() -> int:
    """Threads a backend computes with when nobody says otherwise: the physical cores (hyper-threads
    share a core's vector units; the planner plans with this same number)."""
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    source: str  # "measured" or the profile file it came from
    measured_unix: int | None
    cpu_model: str
    cores_physical: int
    cores_logical: int
    isa: tuple[str, ...]
    ram_total_bytes: int
    ram_available_bytes: int | None  # now, at measurement (None for a device profile)
    cgroup_limit_bytes: int | None
    memory_bandwidth_gbps: float | None  # STREAM-style copy, GB/s
    storage_seq_read_mbps: float | None  # O_DIRECT 4 MiB sequential reads, MB/s
    storage_buffered_read_mbps: float | None  # buffered cold sequential reads, MB/s
    storage_rand_read_mbps: float | None  # O_DIRECT 4 KiB random reads, MB/s
    storage_chunk_read_mbps: float | None  # O_DIRECT reads at random offsets: bandwidth term, MB/s
    storage_chunk_latency_ms: float | None  # ... and fixed cost per read (fit of 1 and 4 MiB reads), ms
    storage_path: str | None
    gemv_q4_gflops: float | None  # ggml Q4_1 matrix-vector, all cores
    gemv_q8_gflops: float | None  # ggml Q8_0 matrix-vector, all cores
    ggml_call_us: float | None  # fixed cost of one small ggml graph computed through ctypes
    convert_mbps: float | None  # nested record -> Q4_1 conversion, MB of Q4_1 per second
    llama_layer_us: float | None  # llama.cpp's fixed cost per layer per decoded token (embedded model)
    offload_layer_us: float | None  # the offload engine's fixed cost per layer per decoded token
    gpu: str | None
    ort_providers: tuple[str, ...]
    llama_rpc: bool
    checksum_mbps: float | None = None  # zlib.crc32 over an expert record, MB/s (None: not measured)
    llc_bytes: int | None = None  # the largest CPU cache (sysfs); weights that fit stay cache-resident
    convert_2bit_mbps: float | None = None  # as convert_mbps from a 2-bit prefix (fewer planes: faster)
    llama_stream_gbps: float | None = None  # GB/s of Q4_1 weights llama.cpp streams decoding a MoE beyond cache
    engine_load_factor: float | None = None  # a bundle's loads in the engine / their steps timed alone
    engine_load_factor_2bit: float | None = None  # ... for 2-bit loads (their conversion behaves apart)
    native_convert: bool | None = None  # edge's C helper converts experts (False: numpy, ~3x slower)
    gemv_types: tuple[tuple[str, float], ...] = ()  # ggml GEMV GFLOP/s by weight type (GGUFs run from the file)
    # the offload engine's compute per decoded token on the GGUF at storage_path, no expert loaded
    # (device.gguf_probes.gguf_step_compute; set by profile.at_gguf for that file only)
    gguf_step_compute_s: float | None = None
    ort_layer_us: float | None = None  # ONNX Runtime's (CPU provider) fixed cost per layer per decoded token
    # ONNX Runtime's bytes of weights per second decoding a MoE over llama.cpp's, on the same probe model
    ort_stream_ratio: float | None = None

    @property
    def usable_memory_bytes(self) -> int:
        """What a model may take now: available RAM, capped by a cgroup limit if one applies."""
        avail = self.ram_available_bytes if self.ram_available_bytes is not None else self.ram_total_bytes
        return min(avail, self.cgroup_limit_bytes) if self.cgroup_limit_bytes else avail

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HardwareProfile":
        kw = {f.name: d.get(f.name) for f in fields(cls)}
        kw["isa"], kw["ort_providers"] = tuple(kw["isa"] or ()), tuple(kw["ort_providers"] or ())
        kw["gemv_types"] = tuple((str(t), float(v)) for t, v in (kw.get("gemv_types") or ()))
        return cls(**kw)
