"""Probes on a MoE GGUF itself, for planning edge's run straight from that file: what one expert
load costs on the file's own disk, and what the offload engine computes per decoded token on the
file's own shapes and types. Each runs the engine's own code on the model's real bytes; no
constant is fitted to any model.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def gguf_load_costs(path: Path, loads: int = 96, seed: int = 0, *, reader=None) -> dict[str, float] | None:
    """What one expert load costs on a MoE GGUF itself, as the offload engine does it (its
    GGUFExperts: the 4 KiB-aligned spans of an expert's three matrices, O_DIRECT, into a slot), at
    ``loads`` random (layer, expert) pairs: {"read_mbps": bytes over seconds, "latency_ms": 0,
    "reads_per_load": 3}. The model's own file on its own disk: the profile's probe file sits in
    edge's cache folder, which may be another disk, and a file written just now may still be in a
    virtual machine's host cache. None where O_DIRECT is refused (buffered reads hit the page
    cache after the first touch, so their speed is not the load's). ``reader``: the file's GGUF
    reader when the caller has one open (opening one parses the whole header: 4.5 s on model A)."""
    from edge.formats.gguf_read import open_reader, read_spec
    from edge.runtime.offload.experts import GGUFExperts, expert_tensors

    reader = reader or open_reader(path)
    spec = read_spec(path, reader)
    experts = GGUFExperts(path, expert_tensors(path, reader, spec), mode="auto")
    del reader
    try:
        if experts.mode != "direct":
            return None
        rng = np.random.default_rng(seed)
        pairs = [(int(rng.integers(spec.n_layers)), int(rng.integers(spec.n_experts))) for _ in range(loads)]
        slots = {i: experts.new_slots(i, 1)[0] for i in sorted({i for i, _ in pairs})}
        experts.load(*pairs[0], 0, slots[pairs[0][0]], "main")  # first touch of the slot's pages
        nbytes, t0 = 0, time.perf_counter()
        for i, e in pairs:
            nbytes += experts.load(i, e, 0, slots[i], "main")
        seconds = time.perf_counter() - t0
    finally:
        experts.close()
    return {"read_mbps": nbytes / seconds / 1e6, "latency_ms": 0.0, "reads_per_load": 3.0}


def gguf_step_compute(path: Path, *, threads: int, repeats: int = 5) -> dict[str, float]:
    """Seconds the offload engine spends computing one decoded token of the GGUF ``path`` when no
    expert has to be read: the engine itself (its ggml graphs over the file's own types, attention,
    routing, the Python between them) on the model's real weights, with a cache of top-k slots per
    layer. One token is decoded after a one-token prompt ``repeats`` + 1 times at the same
    position: the first brings that token's experts into the cache, the others find them there
    (checked: no load), and the median of those is the step. Each step streams the token's experts
    and the trunk from DRAM as a decode does (model A: ~460 MB of experts per token, far beyond
    any last-level cache). Returns {"step_s", "runs", "spread"} (spread: (max - min) / median)."""
    from edge.errors import EdgeError
    from edge.formats.gguf_read import read_spec
    from edge.runtime.offload.open import open_gguf
    from edge.runtime.offload.options import OffloadOptions

    spec = read_spec(path)
    options = OffloadOptions(prefetch=False, slots=(spec.top_k,) * spec.n_layers).resolved()
    engine = open_gguf(Path(path), budget=None, options=options, n_ctx=8, threads=threads)
    try:
        first, token = 1 % spec.vocab_size, 2 % spec.vocab_size
        engine.eval([first])
        times = []
        for k in range(repeats + 1):
            engine.truncate(1)
            loads = engine.telemetry.bytes_read
            t0 = time.perf_counter()
            engine.eval([token])
            dt = time.perf_counter() - t0
            if k and engine.telemetry.bytes_read != loads:
                raise EdgeError("the compute probe loaded an expert on a repeated step: its cache did not hold them")
            if k:
                times.append(dt)
    finally:
        engine.close()
    step = statistics.median(times)
    return {"step_s": step, "runs": len(times), "spread": (max(times) - min(times)) / step}
