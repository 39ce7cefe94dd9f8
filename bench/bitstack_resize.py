"""Resizing a running BitStack model: time per 50 MB step, and whether the process's RSS follows.

    python bench/bitstack_resize.py            # builds /tmp/edge-bench/synth-bitstack on first use

Model: bench/synthetic.py's MoE (16 layers, hidden 1024; dense weights 202 MB in f32), built as an
offload bundle whose 64 attention matrices are a BitStack stack (k = 16, 16 blocks each). One
process loads it, decodes a few tokens, then steps the stack down from full size in 50 MB steps
and back up, decoding one token after each step (the conversation continues). Per step: the
resize's wall time, the stack bytes the engine accounts, and the process's RSS (psutil), median of
--runs passes. Results: docs/bitstack.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MB = 1_000_000


def ensure_bundle(root: Path) -> Path:
    ckpt, out = root / "synth", root / "synth-bitstack"
    if not (ckpt / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(HERE / "synthetic.py"), "--out", str(ckpt)], check=True)
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "edge.cli", "build", str(ckpt), "-o", str(out), "--format", "offload",
                        "--bitstack"], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/edge-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--step-mb", type=int, default=50)
    args = ap.parse_args()
    bundle = ensure_bundle(args.root)

    import numpy as np
    import psutil

    import edge
    from edge.runtime.offload.budget import budget_for_stack

    proc = psutil.Process()
    rows: dict[tuple[str, int], list[tuple[float, int, int]]] = {}
    with edge.load(bundle, memory_budget="1GiB") as m:
        be = m.backend
        full = be.stack.index.full_bytes
        prompt = m.tokenize("def main(argv):\n    ")
        logits = be.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(2):
            logits = be.eval([int(np.argmax(logits))])
        full_tok_s = 2 / (time.perf_counter() - t0)
        sizes = list(range(full, be.stack.index.bytes_at(be.stack.index.min_blocks), -args.step_mb * MB))
        path = sizes + sizes[-2::-1]  # down, then back up
        for _ in range(args.runs):
            for i, target in enumerate(path[1:], 1):
                direction = "shrink" if target < path[i - 1] else "grow"
                rec = m.set_memory_budget(budget_for_stack(be, target))
                rss = proc.memory_info().rss
                logits = be.eval([int(np.argmax(logits))])  # the next token runs on the new size
                if be.n_past > be.n_ctx - 8:
                    be.truncate(len(prompt))
                rows.setdefault((direction, i), []).append((rec["seconds"], rec["stack_bytes"], rss))
        m.set_memory_budget(budget_for_stack(be, sizes[-1]))
        t0 = time.perf_counter()
        for _ in range(2):
            logits = be.eval([int(np.argmax(logits))])
        small_tok_s = 2 / (time.perf_counter() - t0)

    print(f"model: {bundle.name}, stack {full / MB:.1f} MB full, {args.step_mb} MB steps, median of {args.runs} passes")
    print(f"{'step':>4} {'resize':7s} {'stack MB':>9} {'d stack MB':>10} {'RSS MB':>8} {'d RSS MB':>9} {'seconds':>8}")
    prev = None
    worst = 0.0
    for (direction, i), vals in sorted(rows.items(), key=lambda kv: kv[0][1]):
        sec = statistics.median(v[0] for v in vals)
        stack = statistics.median(v[1] for v in vals)
        rss = statistics.median(v[2] for v in vals)
        d_stack = "" if prev is None else f"{(stack - prev[0]) / MB:+10.1f}"
        d_rss = "" if prev is None else f"{(rss - prev[1]) / MB:+9.1f}"
        print(f"{i:4d} {direction:7s} {stack / MB:9.1f} {d_stack:>10} {rss / MB:8.1f} {d_rss:>9} {sec:8.3f}")
        prev = (stack, rss)
        worst = max(worst, sec)
    print(f"decode: {full_tok_s:.2f} tok/s at the full stack, {small_tok_s:.2f} at the smallest step")
    print(f"max_resize_seconds={worst:.3f}")


if __name__ == "__main__":
    main()
