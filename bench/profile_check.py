"""Is the profiler right? Its memory and storage figures against independent tools, side by side.

    python bench/profile_check.py [--dir DIR] [--runs 3]      # root drops the page cache for dd

Memory: the profiler's STREAM-style copy against a plain numpy copy of a 1 GiB array (4x the
profiler's size), timed here. Storage: ``dd`` (coreutils) and the profiler's read probe
(edge.device.storage.read_speeds, what ``edge profile`` runs on its scratch file) reading the same 1 GiB
file, written by ``dd`` in the folder: ``iflag=direct`` against the O_DIRECT figure, and a
buffered read after dropping the page cache against the buffered one. The tools take turns going
first (a virtual disk's host remembers what was just read); medians of --runs. The profiler reads
O_DIRECT into huge-page-backed buffers, as the offload engine does, and dd cannot: a second row
repeats the profiler's read with 4 KiB pages, like for like with dd. Results:
docs/planner.md. The last line is machine-readable: max_diff_pct=<largest |profiler - tool| / tool, %>.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgroup import drop_caches  # noqa: E402

from edge.device.profile import memory_bandwidth_gbps  # noqa: E402
from edge.device.storage import read_speeds


def dd_read_mbps(path: Path, direct: bool) -> float:
    """MB/s that dd reports for reading ``path`` in 4 MiB blocks."""
    if not direct:
        _drop(path)
    argv = ["dd", f"if={path}", "of=/dev/null", "bs=4M"] + (["iflag=direct"] if direct else [])
    err = subprocess.run(argv, capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.,]+) s", err)
    if not m:
        raise RuntimeError(f"cannot read dd's speed from: {err!r}")
    return int(m.group(1)) / float(m.group(2).replace(",", ".")) / 1e6


def _drop(path: Path) -> None:
    if os.geteuid() == 0:
        drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def numpy_copy_gbps(nbytes: int = 1 << 30) -> float:
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "edge")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    scratch = args.dir / f".profile-check-{os.getpid()}.bin"
    rows: dict[str, tuple[list[float], list[float]]] = {
        "memory copy GB/s (numpy 1 GiB)": ([], []), "storage O_DIRECT seq MB/s (dd iflag=direct)": ([], []),
        "  same, profiler with 4 KiB pages like dd": ([], []), "storage buffered cold MB/s (dd)": ([], [])}
    try:
        subprocess.run(["dd", "if=/dev/urandom", f"of={scratch}", "bs=4M", "count=256", "conv=fsync"],
                       capture_output=True, check=True)
        for run in range(args.runs):  # alternate which tool reads first: the disk remembers
            direct, buffered = rows["storage O_DIRECT seq MB/s (dd iflag=direct)"], rows["storage buffered cold MB/s (dd)"]
            small = rows["  same, profiler with 4 KiB pages like dd"]
            if run % 2:
                direct[1].append(dd_read_mbps(scratch, direct=True))
                buffered[1].append(dd_read_mbps(scratch, direct=False))
            _drop(scratch)
            prof = read_speeds(scratch)
            direct[0].append(prof["seq"])
            buffered[0].append(prof["buffered"])
            small[0].append(read_speeds(scratch, 0.2, huge_pages=False)["seq"])
            if not run % 2:
                direct[1].append(dd_read_mbps(scratch, direct=True))
                buffered[1].append(dd_read_mbps(scratch, direct=False))
            small[1].append(direct[1][-1])
            rows["memory copy GB/s (numpy 1 GiB)"][0].append(memory_bandwidth_gbps())
            rows["memory copy GB/s (numpy 1 GiB)"][1].append(numpy_copy_gbps())
    finally:
        scratch.unlink(missing_ok=True)
    print(f"folder: {args.dir}, median of {args.runs}")
    print(f"{'figure (independent tool)':46s} {'profiler':>9s} {'tool':>9s} {'diff':>7s}")
    worst = 0.0
    for name, (mine, theirs) in rows.items():
        a, b = statistics.median(mine), statistics.median(theirs)
        print(f"{name}: profiler {[round(v, 1) for v in mine]}, tool {[round(v, 1) for v in theirs]}", file=sys.stderr)
        diff = (a - b) / b * 100
        worst = max(worst, abs(diff))
        print(f"{name:46s} {a:9.1f} {b:9.1f} {diff:+6.1f}%")
    print(f"max_diff_pct={worst:.1f}")


if __name__ == "__main__":
    main()
