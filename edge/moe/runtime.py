"""Opening an offload bundle: dense weights, expert store, and a budget-sized configuration."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np

from edge.formats import edge_weights
from edge.memory import footprint_bytes
from edge.moe.engine import OffloadConfig, OffloadEngine
from edge.moe.sizing import offload_plan
from edge.moe.store import ExpertStore, StoreIndex
from edge.runtime import ggml

# Headroom under the budget for what RSS cannot show ahead: allocator slack, Python objects,
# per-token activations, and the page cache of the code we run. Without swap, a process whose
# anonymous memory fills its cgroup makes the kernel evict and re-read its own code pages on
# every fault: measured on the synthetic benchmark model at 97% of the cap, decode slowed >10x.
MARGIN_BYTES = 48 << 20
MARGIN_FRACTION = 0.10


def open_offload(bundle: Path, manifest, *, budget: int | None, options, n_ctx: int, threads: int) -> OffloadEngine:
    spec = manifest.spec
    index = StoreIndex.from_dict(manifest.experts)
    dense_path = bundle / "dense.safetensors"
    dense = edge_weights.load(dense_path, spec, experts=False)
    store = ExpertStore(bundle / "experts.bin", index, mode=options.io_mode)
    shapes = index.layout.shapes
    slot_bytes = sum(ggml.row_bytes(ggml.Q4_1, c) * r for r, c in shapes)
    loc = manifest.locality or {}
    sch_curves = np.asarray(loc["sch"]) if "sch" in loc else None
    hotness = np.asarray(loc["hotness"]) if "hotness" in loc else None
    # Build the engine with the smallest cache first, measure what the process then holds,
    # and size the cache from the rest of the budget.
    _, bits = offload_plan(
        n_layers=spec.n_layers, n_experts=spec.n_experts, top_k=spec.top_k, slot_bytes=slot_bytes,
        budget_bytes=None, fixed_bytes=0, sch_curves=None, hotness=hotness, bits=options.bits,
        min_bits=options.min_bits, pin_bits=options.pin_bits)
    config = OffloadConfig(slots=(0,) * spec.n_layers, bits=bits, policy=options.policy,
                           prefetch=options.prefetch, threads=threads, io_mode=options.io_mode)
    engine = OffloadEngine(dense, store, config, n_ctx=n_ctx)
    del dense  # unmaps the float32 file: its pages leave our RSS and can leave the page cache
    gc.collect()
    _drop_page_cache(dense_path)
    fixed = footprint_bytes() + MARGIN_BYTES + int(MARGIN_FRACTION * (budget or 0))
    slots, bits = offload_plan(
        n_layers=spec.n_layers, n_experts=spec.n_experts, top_k=spec.top_k, slot_bytes=slot_bytes,
        budget_bytes=budget, fixed_bytes=fixed, sch_curves=sch_curves, hotness=hotness, bits=options.bits,
        min_bits=options.min_bits, pin_bits=options.pin_bits)
    engine.set_cache(slots, bits)
    if budget is not None:
        engine.budget_bytes = budget
        engine.fixed_bytes = fixed
    return engine


def _drop_page_cache(path: Path) -> None:
    """The dense file was read through the page cache while quantizing; give those pages back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

