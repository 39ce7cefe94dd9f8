"""The hardware profiler: measure this device (seconds), or read a profile from hw-profiles/.

Every number is measured here or read from a sourced profile file; none is assumed. Measurement:
memory bandwidth as a STREAM-style copy (bytes read + bytes written per second, numpy), storage
as O_DIRECT sequential 4 MiB reads and random 4 KiB reads of a scratch file at the given
location (plus a buffered cold read after dropping that file's pages), and kernel throughput as
ggml Q4_1 / Q8_0 matrix-vector products through the same ctypes path the offload engine uses.
The probes that decode with a runtime (fixed costs per layer, llama.cpp's MoE streaming rate) are
in edge/profile_decode.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edge.cache import cache_dir
from edge.errors import EdgeError
from edge.memory import cgroup_memory

PROFILE_TTL_S = 24 * 3600


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
        return cls(**kw)


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


def storage_speeds(directory: Path, nbytes: int = 256 << 20, rand_seconds: float = 1.0) -> dict[str, float | None]:
    """Write a scratch file of incompressible data at ``directory`` and time reads of it (see
    :func:`read_speeds`)."""
    from edge.moe.store import aligned_buffer

    path = Path(directory) / f".edge-profile-{os.getpid()}.tmp"
    block = 4 << 20
    buf = aligned_buffer(block)
    buf[:] = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8)  # not compressible
    try:
        with open(path, "wb") as f:
            for _ in range(nbytes // block):
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        return read_speeds(path, rand_seconds)
    finally:
        path.unlink(missing_ok=True)


def read_speeds(path: Path, rand_seconds: float = 1.0, *, huge_pages: bool = True) -> dict[str, float | None]:
    """Read speeds of an existing file, MB/s: O_DIRECT sequential 4 MiB reads ("seq"), random
    4 KiB reads ("rand"), scattered 1 and 4 MiB reads fitted to bandwidth + latency ("chunk",
    "latency" in ms), and buffered sequential reads after dropping the file's pages ("buffered").
    The O_DIRECT buffer is huge-page backed, as the offload engine's are (``huge_pages=False``:
    4 KiB pages, as ``dd`` uses)."""
    from edge.moe.store import aligned_buffer

    block = 4 << 20
    nbytes = os.path.getsize(path) // block * block
    if nbytes == 0:
        raise EdgeError(f"{path}: too small to time reads of ({os.path.getsize(path):,} bytes; needs 4 MiB)")
    buf = aligned_buffer(block, huge=huge_pages)
    out: dict[str, float | None] = {"seq": None, "buffered": None, "rand": None, "chunk": None, "latency": None}
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        direct = True
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    try:
        if direct:
            t0 = time.perf_counter()
            for off in range(0, nbytes, block):
                os.preadv(fd, [buf], off)
            out["seq"] = nbytes / (time.perf_counter() - t0) / 1e6
            small, n, rng = buf[:4096], 0, np.random.default_rng(1)
            offsets = rng.integers(0, nbytes // 4096, 1 << 16) * 4096
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < rand_seconds and n < len(offsets):
                os.preadv(fd, [small], int(offsets[n]))
                n += 1
            out["rand"] = n * 4096 / (time.perf_counter() - t0) / 1e6
            # Expert loads are single 1-5 MiB reads at scattered offsets.
            offs = (rng.integers(0, nbytes // block, 64) * block).tolist()
            out["chunk"], out["latency"] = scattered_read_fit(fd, offs, (1 << 20, block), buf)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold without root (pages we may drop)
        t0 = time.perf_counter()
        got, plain = 0, np.empty(block, np.uint8)  # one reused buffer: no page faults of fresh ones
        while got < nbytes and (n := os.readv(fd, [plain])):
            got += n
        out["buffered"] = got / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)
    return out


def scattered_read_fit(fd: int, offsets: list[int], sizes: tuple[int, int], buf: np.ndarray) -> tuple[float, float]:
    """Fit t = latency + size / bandwidth to O_DIRECT reads of two sizes at the given (aligned)
    offsets, alternating sizes read by read so that both see the same disk state; medians, not
    means, so one stalled read does not move the fit. Returns (MB/s, latency ms)."""
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for i, off in enumerate(offsets):
        size = sizes[i % 2]
        t0 = time.perf_counter()
        os.preadv(fd, [buf[:size]], off)
        times[size].append(time.perf_counter() - t0)
    (s0, t0), (s1, t1) = sorted((size, statistics.median(ts)) for size, ts in times.items())
    slope = max((t1 - t0) / (s1 - s0), 1e-12)
    return 1 / slope / 1e6, max(t0 - s0 * slope, 0.0) * 1e3


def store_load_costs(bundle: Path, reads: int = 64, records: int = 32) -> dict[str, float] | None:
    """What one expert load costs on an offload bundle's own store, step by step as the engine does
    it: scattered O_DIRECT reads at record starts (2- and 4-bit prefixes, fitted to latency +
    bandwidth), the checksum of a 4-bit prefix, and its conversion into a Q4_1 slot. The record
    shapes matter: a real expert (megabytes) converts at half the speed of a cache-sized one.
    None where O_DIRECT is refused."""
    from edge.bundle import read_manifest
    from edge.moe.store import ExpertStore, StoreIndex, aligned_buffer
    from edge.quant.nested import q4_1_bytes, to_q4_1

    bundle = Path(bundle)
    index = StoreIndex.from_dict(read_manifest(bundle).experts)
    store = ExpertStore(Path(bundle) / "experts.bin", index, mode="auto")
    try:
        if store.mode != "direct":
            return None
        sizes = (store.read_bytes(2), store.read_bytes(4))
        buf = aligned_buffer(max(sizes))
        rng = np.random.default_rng()
        n = index.n_layers * index.n_experts
        picks = [(int(r) // index.n_experts, int(r) % index.n_experts) for r in rng.integers(0, n, max(reads, records))]
        mbps, latency = scattered_read_fit(store._fd, [index.offset(*p) for p in picks[:reads]], sizes, buf)
        layout = index.layout
        out, scratch = np.empty(q4_1_bytes(layout), np.uint8), np.empty(layout.n_weights, np.uint8)
        crc, conv, conv2 = [], [], []
        for layer, expert in picks[:records]:
            view = buf[: sizes[1]]
            os.preadv(store._fd, [view], index.offset(layer, expert))
            t0 = time.perf_counter()
            store._verify(layer, expert, 4, view)
            t1 = time.perf_counter()
            to_q4_1(view, layout, 4, out=out, scratch=scratch)
            t2 = time.perf_counter()
            to_q4_1(buf[: sizes[0]], layout, 2, out=out, scratch=scratch)  # 2 of the 4 bits' planes
            crc.append(t1 - t0)
            conv.append(t2 - t1)
            conv2.append(time.perf_counter() - t2)
        return {"read_mbps": mbps, "latency_ms": latency,
                "checksum_mbps": layout.prefix_bytes(4) / statistics.median(crc) / 1e6,
                "convert_mbps": out.nbytes / statistics.median(conv) / 1e6,
                "convert_2bit_mbps": out.nbytes / statistics.median(conv2) / 1e6}
    finally:
        store.close()


def at_bundle(profile: HardwareProfile, bundle: Path) -> HardwareProfile:
    """This device's profile with the expert-load figures (read, checksum, conversion) measured on
    ``bundle``'s own expert store, and how much dearer loads are inside the engine decoding it."""
    if profile.source != "measured":  # a device profile: this machine's disk says nothing about it
        return profile
    from edge.profile_decode import measure_engine_load_factors

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


def gemv_gflops(gtype: int, rows: int = 4096, cols: int = 4096, n_mats: int = 12, reps: int = 5) -> float:
    """ggml matrix-vector throughput (2 flops per weight), all cores, over ``n_mats`` matrices used
    in turn: their total (about 120 MB at Q4_1) exceeds any CPU cache, so this is the rate at which
    weights stream from DRAM, as in decoding a model — one cache-resident matrix would measure the
    cache instead (it read 2x faster here)."""
    from edge.runtime import ggml

    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    ws = [ggml.Weight.quantized(base, gtype) for _ in range(n_mats)]
    x = rng.standard_normal((1, cols)).astype(np.float32)
    mem = np.empty(4 << 20, np.uint8)
    threads = os.cpu_count() or 1

    def run():  # one graph for all: the fixed cost per graph is measured apart (ggml_call_us)
        g = ggml.Graph(buffer=mem)
        xi = g.input(x)
        g.compute([g.matmul(w, xi) for w in ws], threads)

    run()
    return 2 * rows * cols * n_mats / _median_time(run, reps) / 1e9


def ggml_call_us(reps: int = 200) -> float:
    """Fixed cost of computing one tiny ggml graph through ctypes (the offload engine runs a few
    graphs per layer per token, so this is its per-layer floor)."""
    from edge.runtime import ggml

    w = ggml.Weight.quantized(np.eye(64, dtype=np.float32), ggml.Q8_0)
    x = np.ones((1, 64), np.float32)
    mem = np.empty(1 << 20, np.uint8)
    threads = os.cpu_count() or 1

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
    from edge.profile_decode import llama_layer_us, llama_stream_gbps, offload_layer_us
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
    llama_us = llama_layer_us(q4, llc=llc)
    llama_stream = llama_stream_gbps(llama_us, llc=llc)
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
        gemv_q4_gflops=round(q4, 1), gemv_q8_gflops=round(gemv_gflops(ggml.Q8_0), 1),
        ggml_call_us=round(ggml_call_us(), 1), convert_mbps=round(convert), checksum_mbps=round(checksum),
        llama_layer_us=round(llama_us, 1), offload_layer_us=round(offload_layer_us(q4, llc=llc), 1),
        gpu=_gpu(), ort_providers=providers, llama_rpc=rpc, llc_bytes=llc,
        llama_stream_gbps=None if llama_stream is None else round(llama_stream, 2),
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
