"""Expert offloading under a memory cap: edge's offload engine against llama.cpp, side by side.

    python bench/offload.py                 # builds the synthetic model and bundles on first use
    python bench/offload.py --runs 3 --tokens 64 --cap-fraction 0.4

Model: bench/synthetic.py's Mixtral-architecture MoE (1.16 GiB of experts at 4 bits), one
Hugging Face checkpoint turned into both systems' files by edge: a Q4_1 GGUF for llama.cpp
(llama-cpp-python, default settings, mmap on) and an offload bundle for edge (nested experts,
served at 4 bits for the hottest and down to 2 for the coldest: HEBF). Both: 2 threads, same
prompt, 64 greedy tokens, inside one cgroup-v1 memory cap of 40% of the Q4_1 file, page cache
dropped before every run, median of 3. Needs root (cgroups, drop_caches). Results: docs/offload.md.

Why Q4_1: llama.cpp repacks Q4_0 (and Q4_K) weights into anonymous memory for its AVX2 kernels,
which defeats mmap: under the cap a Q4_0 run is OOM-killed before its first token. Q4_1 stays
memory-mapped, and it is exactly the 4-bit format edge's kernels use.

The last line is machine-readable: decode_ratio=<edge tok/s / llama.cpp tok/s under the cap>.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cgroup import MemoryCap, drop_caches  # noqa: E402


def ensure_inputs(root: Path) -> tuple[Path, Path, Path]:
    ckpt, gguf_bundle, off_bundle = root / "synth", root / "synth-q4_1", root / "synth-offload"
    edge_cli = [sys.executable, "-m", "edge.cli"]
    if not (ckpt / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(HERE / "synthetic.py"), "--out", str(ckpt)], check=True)
    if not (gguf_bundle / "manifest.json").is_file():
        subprocess.run([*edge_cli, "build", str(ckpt), "-o", str(gguf_bundle), "--format", "gguf", "--type", "q4_1"],
                       check=True)
    if not (off_bundle / "manifest.json").is_file():
        subprocess.run([*edge_cli, "build", str(ckpt), "-o", str(off_bundle), "--format", "offload"], check=True)
    return ckpt, gguf_bundle, off_bundle


def sequential_read_mb_s(path: Path, nbytes: int = 1 << 30) -> float:
    """Cold-cache buffered sequential read of the expert file, 4 MiB at a time (what the disk gives)."""
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    t0, got = time.perf_counter(), 0
    try:
        while got < nbytes:
            block = os.read(fd, 4 << 20)
            if not block:
                break
            got += len(block)
    finally:
        os.close(fd)
    return got / (time.perf_counter() - t0) / 1e6


def run(system: str, path: Path, cap: int | None, tokens: int, threads: int, opts: dict | None = None,
        *, cold: bool = True) -> dict:
    """One decode run of _decode_one.py in a fresh process inside a cap (None: no limit);
    ``cold`` drops the page cache first."""
    if cold:
        drop_caches()
    argv = [sys.executable, str(HERE / "_decode_one.py"), system, str(path), str(tokens), str(threads)]
    if opts is not None:
        argv.append(json.dumps(opts))
    with MemoryCap(cap) as group:
        proc = group.run(argv, capture_output=True, text=True, timeout=3600)
        peak, ooms = group.peak_bytes, group.oom_kills
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}" + (" (OOM-killed)" if ooms else "") + f": {proc.stderr[-300:]}",
                "peak": peak}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["peak"] = peak
    return out


def median_of(results: list[dict], key: str) -> float | None:
    vals = [r[key] for r in results if "failed" not in r]
    return statistics.median(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/edge-bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-fraction", type=float, default=0.4)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: needs root (cgroup memory limits and drop_caches)")
    _, gguf_bundle, off_bundle = ensure_inputs(args.root)
    gguf = gguf_bundle / "model.gguf"
    model_bytes = gguf.stat().st_size
    cap = int(model_bytes * args.cap_fraction)
    # Load each bundle once outside the cap so its files are verified (hashed) before timing.
    for b in (gguf_bundle, off_bundle):
        subprocess.run([sys.executable, "-c", f"import edge; edge.load({str(b)!r}).close()"], check=True)
    disk = sequential_read_mb_s(off_bundle / "experts.bin")
    edge_opts = {"memory_budget": cap}
    cases = [
        ("llama.cpp (mmap, Q4_1)", "llamacpp", gguf, cap, None),
        ("edge offload (HEBF 4->2 bits)", "edge", off_bundle, cap, dict(edge_opts)),
        ("edge offload (pinned 4 bits)", "edge", off_bundle, cap, dict(edge_opts, pin_bits=True)),
        ("llama.cpp, no cap", "llamacpp", gguf, None, None),
        ("edge -> llama.cpp backend, no cap", "edge", gguf_bundle, None, {}),
    ]
    rows = {}
    for name, system, path, c, opts in cases:
        results = [run(system, path, c, args.tokens, args.threads, opts) for _ in range(args.runs)]
        rows[name] = results
        ok = [r for r in results if "failed" not in r]
        print(f"{name}: " + ", ".join(f"{r['decode_tok_s']:.2f}" if "failed" not in r else r["failed"][:60]
                                       for r in results) + " tok/s", file=sys.stderr, flush=True)
        if not ok:
            continue
    base = median_of(rows["llama.cpp (mmap, Q4_1)"], "decode_tok_s")
    base_nocap = median_of(rows["llama.cpp, no cap"], "decode_tok_s")
    print("cgroup peak: the group's max usage, page cache included (the kernel fills the cap with cache); "
          "peak RSS: the process's own high-water mark")
    print(f"model: {model_bytes / 2**30:.2f} GiB Q4_1 GGUF (synthetic Mixtral MoE, 16 layers x 16 experts, top-2); "
          f"cap {cap / 2**20:.0f} MiB = {args.cap_fraction:.0%}; {args.tokens} tokens, {args.threads} threads, "
          f"median of {args.runs}; disk sequential read {disk:.0f} MB/s")
    print(f"{'system':36s} {'cap MiB':>8s} {'decode tok/s':>12s} {'ratio':>7s} {'cgroup peak MiB':>15s} "
          f"{'peak RSS MiB':>12s} {'hit rate':>8s} {'MB read/tok':>11s} {'SSD MB/s':>9s}")
    for name, system, path, c, opts in cases:
        results = rows[name]
        ok = [r for r in results if "failed" not in r]
        if not ok:
            print(f"{name:36s} {'-' if c is None else c // 2**20:>8} {'failed':>12s}  {results[0]['failed'][:60]}")
            continue
        tok_s = median_of(results, "decode_tok_s")
        ref = base if c is not None else base_nocap
        m = [r["metrics"] for r in ok if r.get("metrics") and r["metrics"].get("bytes_read") is not None]
        hit = statistics.median(x["hit_rate"] for x in m) if m else None
        per_tok = statistics.median(x["bytes_read"] / max(1, args.tokens + 1) / 1e6 for x in m) if m else None
        ssd = statistics.median(x["ssd_mb_per_s"] for x in m if x["ssd_mb_per_s"]) if m else None
        peak = statistics.median(r["peak"] for r in ok) / 2**20
        rss = statistics.median(r["peak_rss"] for r in ok) / 2**20
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{name:36s} {'-' if c is None else c // 2**20:>8} {tok_s:12.2f} {fmt(tok_s / ref if ref else None, '6.2f')}x "
              f"{peak:15.0f} {rss:12.0f} {fmt(hit, '8.3f')} {fmt(per_tok, '11.1f')} {fmt(ssd, '9.0f')}")
    edge_tok = median_of(rows["edge offload (HEBF 4->2 bits)"], "decode_tok_s")
    print(f"decode_ratio={edge_tok / base:.2f}" if edge_tok and base else "decode_ratio=nan")


if __name__ == "__main__":
    main()
