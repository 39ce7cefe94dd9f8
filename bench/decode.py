"""Decode and prefill speed of edge's backends on one model, side by side.

    python bench/decode.py [--model DIR] [--tokens 64] [--runs 3] [--threads 2]

Runs the reference engine (numpy) and llama.cpp (f32 and q8_0 GGUFs of the same checkpoint,
converted by edge) on the same prompt with the same thread count, greedy, and prints medians
of --runs runs and the ratio to llama.cpp f32. Results: docs/bench-decode.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.formats.gguf_write import write_gguf  # noqa: E402
from edge.formats.hf import load_weights  # noqa: E402
from edge.models import default_model_path  # noqa: E402
from edge.runtime.llamacpp import LlamaCppBackend  # noqa: E402
from edge.runtime.reference import ReferenceEngine  # noqa: E402
from edge.runtime.tokenizer import HFTokenizer  # noqa: E402

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser("


def measure(make_backend, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one fresh backend, greedy."""
    be = make_backend()
    try:
        t0 = time.perf_counter()
        logits = be.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(n):
            logits = be.eval([int(np.argmax(logits))])
        t2 = time.perf_counter()
    finally:
        be.close()
    return len(prompt) / (t1 - t0), n / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    weights = load_weights(args.model)
    prompt = HFTokenizer(args.model / "tokenizer.json").encode(PROMPT)
    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    ggufs = {}
    for t in ("f32", "q8_0"):
        ggufs[t] = tmp / f"model-{t}.gguf"
        write_gguf(weights, args.model / "tokenizer.json", ggufs[t], outtype=t, bos_id=0, eos_id=0)
    systems = {
        "edge reference (numpy, f32)": lambda: ReferenceEngine(weights, n_ctx=512),
        "llama.cpp f32": lambda: LlamaCppBackend(ggufs["f32"], n_ctx=512, n_threads=args.threads),
        "llama.cpp q8_0": lambda: LlamaCppBackend(ggufs["q8_0"], n_ctx=512, n_threads=args.threads),
    }
    results = {}
    for name, make in systems.items():
        runs = [measure(make, prompt, args.tokens) for _ in range(args.runs)]
        results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    base = results["llama.cpp f32"][1]
    print(f"model {args.model.name}, prompt {len(prompt)} tokens, {args.tokens} decoded, "
          f"threads {args.threads}, median of {args.runs}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"{'system':32s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode vs llama.cpp f32':>24s}")
    for name, (pre, dec) in results.items():
        print(f"{name:32s} {pre:14.1f} {dec:13.1f} {dec / base:23.2f}x")
    for p in ggufs.values():
        p.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
