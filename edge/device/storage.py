"""Storage probes: how fast this device reads a file the way the offload engine does (O_DIRECT
sequential and scattered reads into huge-page buffers, random 4 KiB reads, buffered cold reads), and
what one expert load costs on a bundle's own store, step by step.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.memory import aligned_buffer


def storage_speeds(directory: Path, nbytes: int = 256 << 20, rand_seconds: float = 1.0) -> dict[str, float | None]:
    """Write a scratch file of incompressible data at ``directory`` and time reads of it (see
    :func:`read_speeds`)."""
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
    from edge.formats.bundle import read_manifest
    from edge.quant.nested import q4_1_bytes, to_q4_1
    from edge.quant.store import StoreIndex
    from edge.runtime.offload.store import ExpertStore

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
