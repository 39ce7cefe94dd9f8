"""One measured decode run, executed by bench/offload.py in a fresh process (inside a memory cap).

    python bench/_decode_one.py SYSTEM PATH TOKENS THREADS [OFFLOAD-OPTIONS-JSON]

OPTIONS may also set prompt_repeat (the prompt that many times over, to time prefill).
SYSTEM: llamacpp (llama.cpp on a GGUF through llama-cpp-python's own model, context and batch
handles: llama.cpp computes everything; OPTIONS may set its load_mode, lazy_mode and extra_bufts,
default mmap, off, and on except where ggml would use its AMX kernels, which crash on this kind of
machine) or edge (edge.load on a bundle or GGUF). Prints one JSON line: prefill and decode timings,
and edge's engine metrics.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edge, installed or not

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser("


def main() -> None:
    system, path, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    opts = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    text = PROMPT * opts.pop("prompt_repeat", 1)  # a longer prompt times prefill
    t0 = time.perf_counter()
    if system == "llamacpp":
        from edge.runtime.llamacpp import LlamaCppBackend, LoadOptions

        be = LlamaCppBackend(path, n_ctx=512, n_threads=threads, load=LoadOptions(**opts))
        prompt = be.model.tokenize(text.encode(), add_bos=False, special=False)
        step = be.eval
        metrics = None
    else:
        import edge
        from edge.sdk import OffloadOptions

        budget = opts.pop("memory_budget", None)
        backend = opts.pop("backend", "auto")
        m = edge.load(path, n_ctx=512, n_threads=threads, memory_budget=budget, backend=backend,
                      offload=OffloadOptions(**opts))
        prompt = m.tokenize(text)
        step = m.backend.eval
    t1 = time.perf_counter()
    logits = step(prompt)
    t_prefill = time.perf_counter()
    # before the clock starts: the first metrics() call imports psutil (8.5 ms here, a third of
    # the default model's whole 64-token decode)
    before = decode_counters(m.metrics() if system != "llamacpp" else None)
    t2 = time.perf_counter()
    tokens = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        tokens.append(tok)
        logits = step([tok])
    t3 = time.perf_counter()
    decode = {k: v - before[k] for k, v in decode_counters(m.metrics() if system != "llamacpp" else None).items()}
    if system != "llamacpp":
        metrics = m.metrics()
        metrics.pop("per_layer", None)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"peak_rss": peak_rss, "load_s": t1 - t0, "prefill_s": t_prefill - t1, "prompt_tokens": len(prompt),
                      "decode_tok_s": n / (t3 - t2), "tokens": tokens, "metrics": metrics,
                      "decode": decode}))


def storage_read_bytes() -> int:
    """Bytes this process made the kernel read from storage (/proc/self/io read_bytes): page
    faults on a memory-mapped file and O_DIRECT reads alike."""
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def decode_counters(metrics: dict | None) -> dict:
    """Counters whose change over the decode loop tells where its time went: major page faults
    (file pages read back in), bytes read from storage, and for edge's engine expert loads, bytes
    it read and stalls."""
    out = {"major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt, "storage_bytes": storage_read_bytes()}
    if metrics and "cache_misses" in metrics:  # the offload engine (edge on a GGUF runs llama.cpp)
        out.update(loads=metrics["expert_loads"], bytes_read=metrics["bytes_read"],
                   stall_seconds=metrics["stall_seconds"], hits=metrics["cache_hits"], misses=metrics["cache_misses"])
    return out


if __name__ == "__main__":
    main()
