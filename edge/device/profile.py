"""The hardware profiler: measure this device (seconds), or read a profile from hw-profiles/.

Every number is measured here or read from a sourced profile file; none is assumed. Measurement:
memory bandwidth as a STREAM-style copy (bytes read + bytes written per second, numpy), storage
as O_DIRECT sequential 4 MiB reads and random 4 KiB reads of a scratch file at the given
location (plus a buffered cold read after dropping that file's pages), and kernel throughput as
ggml Q4_1 / Q8_0 matrix-vector products through the same ctypes path the offload engine uses.
The storage probes are in edge/device/storage.py, the probes that decode with a runtime (fixed
costs per layer, llama.cpp's MoE streaming rate, the engine's load factor) in edge/device/probes.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import psutil

from edge import _native
from edge.device.storage import storage_speeds, store_load_costs
from edge.hardware import HardwareProfile, default_threads
from edge.memory import cgroup_memory
from edge.paths import cache_dir

PROFILE_TTL_S = 24 * 3600


def _cpu_info() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = val.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile",
              "neon", "asimd", "asimddp", "i8mm", "sve", "sve2", "fphp", "asimdhp")
    return model, tuple(f for f in wanted if f in flags)


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth_gbps(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """STREAM-style copy: (read + write) bytes per second of a large numpy copy."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    return 2 * nbytes / _median_time(lambda: np.copyto(dst, src), reps) / 1e9


def at_bundle(profile: HardwareProfile, bundle: Path) -> HardwareProfile:
    """This device's profile with the expert-load figures (read, checksum, conversion) measured on
    ``bundle``'s own expert store, and how much dearer loads are inside the engine decoding it."""
    if profile.source != "measured":  # a device profile: this machine's disk says nothing about it
        return profile
    from edge.device.probes import measure_engine_load_factors

    costs = store_load_costs(bundle)
    if costs is None:
        return profile
    probed = HardwareProfile.from_dict(profile.to_dict() | {
        "storage_chunk_read_mbps": round(costs["read_mbps"]), "storage_chunk_latency_ms": round(costs["latency_ms"], 3),
        "checksum_mbps": round(costs["checksum_mbps"]), "convert_mbps": round(costs["convert_mbps"]),
        "convert_2bit_mbps": round(costs["convert_2bit_mbps"]),
        "storage_path": str(Path(bundle) / "experts.bin")})
    factors = measure_engine_load_factors(Path(bundle), probed, (4, 2))
    rounded = {b: None if f is None else round(f, 3) for b, f in factors.items()}
    return dataclasses.replace(probed, engine_load_factor=rounded[4], engine_load_factor_2bit=rounded[2])


def at_gguf(profile: HardwareProfile, path: Path, reader=None) -> HardwareProfile:
    """This device's profile with what running the MoE GGUF ``path`` straight from the file costs,
    measured on the file itself (device.gguf_probes): one expert load as the offload engine reads it
    (the file's own disk, not the profile's probe file) and the engine's compute per decoded token
    on the model's own shapes and types (the planner's GEMV rates and the default model's fixed
    cost per layer missed it by 25-60% on the shapes of docs/realshape.md). ``reader``: the file's
    GGUF reader, if the caller has one open."""
    if profile.source != "measured":  # a device profile: this machine says nothing about it
        return profile
    from edge.device.gguf_probes import gguf_load_costs, gguf_step_compute

    step = gguf_step_compute(Path(path), threads=default_threads())
    out = dataclasses.replace(profile, gguf_step_compute_s=round(step["step_s"], 5), storage_path=str(path))
    costs = gguf_load_costs(Path(path), reader=reader)
    if costs is None:
        return out
    return dataclasses.replace(out, storage_chunk_read_mbps=round(costs["read_mbps"]),
                               storage_chunk_latency_ms=costs["latency_ms"])


def gemv_gflops(gtype: int, rows: int = 4096, cols: int = 4096, n_mats: int = 12, reps: int = 5) -> float:
    """ggml matrix-vector throughput (2 flops per weight), all cores, over ``n_mats`` matrices used
    in turn: their total (about 120 MB at Q4_1) exceeds any CPU cache, so this is the rate at which
    weights stream from DRAM, as in decoding a model — one cache-resident matrix would measure the
    cache instead (it read 2x faster here)."""
    from edge.runtime import ggml

    rng = np.random.default_rng(0)
    # 256 rows quantized once and tiled (K-quants quantize at ~11 M weights/s here): the product's
    # speed depends on the bytes streamed, not on whether rows repeat
    block = ggml.Weight.quantized(rng.standard_normal((256, cols)).astype(np.float32) * 0.02, gtype).data
    tiled = np.tile(block, rows // 256)
    ws = [ggml.Weight.from_bytes(gtype, rows, cols, tiled) for _ in range(n_mats)]
    x = rng.standard_normal((1, cols)).astype(np.float32)
    mem = np.empty(4 << 20, np.uint8)
    threads = default_threads()

    def run():  # one graph for all: the fixed cost per graph is measured apart (ggml_call_us)
        g = ggml.Graph(buffer=mem)
        xi = g.input(x)
        g.compute([g.matmul(w, xi) for w in ws], threads)

    run()
    return 2 * rows * cols * n_mats / _median_time(run, reps) / 1e9


# The types whose products a GGUF run straight from the file computes: llama.cpp's published mixes.
GEMV_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "MXFP4")


def gemv_by_type(types=GEMV_TYPES) -> tuple[tuple[str, float], ...]:
    """ggml GEMV GFLOP/s for each weight type (as :func:`gemv_gflops`): bytes per second differ by
    type, and on this 2-core VM the products are compute-bound (Q4_1: 6.6 GB/s of weights where a
    copy moves 23), so a K-quant's rate cannot be read off Q4_1's."""
    from edge.runtime import ggml

    return tuple((t, round(gemv_gflops(ggml.type_id(t), n_mats=8, reps=3), 1)) for t in types)


def ggml_call_us(reps: int = 200) -> float:
    """Fixed cost of computing one tiny ggml graph through ctypes (the offload engine runs a few
    graphs per layer per token, so this is its per-layer floor)."""
    from edge.runtime import ggml

    w = ggml.Weight.quantized(np.eye(64, dtype=np.float32), ggml.Q8_0)
    x = np.ones((1, 64), np.float32)
    mem = np.empty(1 << 20, np.uint8)
    threads = default_threads()

    def run():
        g = ggml.Graph(buffer=mem)
        g.compute([g.matmul(w, g.input(x))], threads)

    run()
    return _median_time(run, reps) * 1e6


def record_costs(reps: int = 5) -> tuple[float, float]:
    """(Q4_1 conversion MB/s, checksum MB/s) on an expert-sized nested record (three 1024 x 2816
    matrices, 8.6 M weights, like the benchmark model's experts): conversion writes megabytes, so a
    cache-sized record would overstate it by about 2x (measured: 1.9 vs 0.9-1.4 GB/s here)."""
    from edge.quant.nested import NestedLayout, encode, q4_1_bytes, to_q4_1

    rng = np.random.default_rng(2)
    shapes = ((2816, 1024), (2816, 1024), (1024, 2816))
    layout = NestedLayout(shapes)
    record = encode([rng.standard_normal(sh).astype(np.float32) for sh in shapes])
    out, scratch = np.empty(q4_1_bytes(layout), np.uint8), np.empty(layout.n_weights, np.uint8)
    prefix = np.frombuffer(record, np.uint8)[: layout.prefix_bytes(4)]
    convert = out.nbytes / _median_time(lambda: to_q4_1(record, layout, 4, out=out, scratch=scratch), reps) / 1e6
    checksum = prefix.nbytes / _median_time(lambda: zlib.crc32(prefix), reps) / 1e6
    return convert, checksum


def llc_bytes() -> int | None:
    """Size of this CPU's largest (last-level) cache from sysfs; None where it is not exposed."""
    best: tuple[int, int] | None = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = int((d / "level").read_text()), (d / "size").read_text().strip()
            n = int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[size[-1]] if size[-1].isalpha() else int(size)
        except (OSError, ValueError, KeyError, IndexError):
            continue
        best = max(best or (level, n), (level, n))
    return best[1] if best else None


def _gpu() -> str | None:
    for dev in ("/dev/nvidia0", "/dev/kfd", "/dev/dri/renderD128"):
        if Path(dev).exists():
            return dev
    return None


def measure(storage_dir: Path | None = None) -> HardwareProfile:
    """Measure this device (a few seconds)."""
    from edge.device.probes import layer_costs, llama_stream_gbps, offload_layer_us, ort_stream_ratio
    from edge.runtime import ggml

    model, isa = _cpu_info()
    vm = psutil.virtual_memory()
    cg = cgroup_memory()
    storage_dir = Path(storage_dir or cache_dir())
    speeds = storage_speeds(storage_dir)
    q4 = gemv_gflops(ggml.Q4_1)
    convert, checksum = record_costs()
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except ImportError:
        providers = ()
    try:
        import llama_cpp

        rpc = any((Path(llama_cpp.__file__).parent / "lib").glob("libggml-rpc.so*"))
    except ImportError:
        rpc = False
    llc = llc_bytes()
    llama_us, ort_us = layer_costs(q4, llc, "CPUExecutionProvider" in providers)
    llama_stream = llama_stream_gbps(llama_us, llc=llc)
    ort_ratio = ort_stream_ratio(ort_us, llama_us)
    return HardwareProfile(
        name=platform.node() or "this device", source="measured", measured_unix=int(time.time()),
        cpu_model=model, cores_physical=psutil.cpu_count(logical=False) or 1,
        cores_logical=psutil.cpu_count(logical=True) or 1, isa=isa,
        ram_total_bytes=vm.total, ram_available_bytes=vm.available, cgroup_limit_bytes=cg[1] if cg else None,
        memory_bandwidth_gbps=round(memory_bandwidth_gbps(), 2),
        storage_seq_read_mbps=None if speeds["seq"] is None else round(speeds["seq"]),
        storage_buffered_read_mbps=None if speeds["buffered"] is None else round(speeds["buffered"]),
        storage_rand_read_mbps=None if speeds["rand"] is None else round(speeds["rand"], 1),
        storage_chunk_read_mbps=None if speeds["chunk"] is None else round(speeds["chunk"]),
        storage_chunk_latency_ms=None if speeds["latency"] is None else round(speeds["latency"], 3),
        storage_path=str(storage_dir),
        gemv_q4_gflops=round(q4, 1), gemv_q8_gflops=round(gemv_gflops(ggml.Q8_0), 1), gemv_types=gemv_by_type(),
        ggml_call_us=round(ggml_call_us(), 1), convert_mbps=round(convert), checksum_mbps=round(checksum),
        llama_layer_us=round(llama_us, 1), offload_layer_us=round(offload_layer_us(q4, llc=llc), 1),
        gpu=_gpu(), ort_providers=providers, llama_rpc=rpc, llc_bytes=llc,
        llama_stream_gbps=None if llama_stream is None else round(llama_stream, 2),
        native_convert=_native.nested_to_q4_1 is not None,
        ort_layer_us=None if ort_us is None else round(ort_us, 1),
        ort_stream_ratio=None if ort_ratio is None else round(ort_ratio, 3),
    )


def cached_profile(refresh: bool = False, storage_dir: Path | None = None) -> HardwareProfile:
    """This device's profile, measured at most once a day (``refresh`` forces a new measurement)."""
    path = cache_dir() / "profile.json"
    if not refresh and storage_dir is None:
        try:
            data = json.loads(path.read_text())
            prof = HardwareProfile.from_dict(data)
            if prof.measured_unix and time.time() - prof.measured_unix < PROFILE_TTL_S:
                # memory available now, not a day ago
                cg = cgroup_memory()
                return HardwareProfile.from_dict(prof.to_dict() | {
                    "ram_available_bytes": psutil.virtual_memory().available,
                    "cgroup_limit_bytes": cg[1] if cg else None})
        except (OSError, ValueError, TypeError):
            pass
    prof = measure(storage_dir)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(prof.to_dict(), indent=2))
    os.replace(tmp, path)
    return prof
