"""Opening an offload bundle: dense weights, expert store, and a budget-sized configuration."""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.formats import edge_weights
from edge.memory import footprint_bytes
from edge.moe.engine import OffloadConfig, OffloadEngine
from edge.moe.sizing import offload_plan
from edge.moe.store import ExpertStore, StoreIndex
from edge.quant.stack import LoadedStack, StackIndex, blocks_for_budget
from edge.runtime import ggml
from edge.units import format_bytes

log = logging.getLogger(__name__)

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
    dense = edge_weights.load(dense_path, spec, experts=False, stacked=manifest.bitstack is not None)
    store = ExpertStore(bundle / "experts.bin", index, mode=options.io_mode)
    stack = None
    if manifest.bitstack is not None:
        stack = LoadedStack(bundle / "dense.stack", StackIndex.from_dict(manifest.bitstack))
    shapes = index.layout.shapes
    slot_bytes = sum(ggml.row_bytes(ggml.Q4_1, c) * r for r, c in shapes)
    loc = manifest.locality or {}
    sch_curves = np.asarray(loc["sch"]) if "sch" in loc else None
    hotness = np.asarray(loc["hotness"]) if "hotness" in loc else None
    # Build the engine with the smallest cache (and no stack blocks) first, measure what the
    # process then holds, and size the stack and the cache from the rest of the budget.
    _, bits = offload_plan(
        n_layers=spec.n_layers, n_experts=spec.n_experts, top_k=spec.top_k, slot_bytes=slot_bytes,
        budget_bytes=None, fixed_bytes=0, sch_curves=None, hotness=hotness, bits=options.bits,
        min_bits=options.min_bits, pin_bits=options.pin_bits)
    config = OffloadConfig(slots=(0,) * spec.n_layers, bits=bits, policy=options.policy,
                           prefetch=options.prefetch, threads=threads, io_mode=options.io_mode)
    engine = OffloadEngine(dense, store, config, n_ctx=n_ctx, stack=stack)
    del dense  # unmaps the float32 file: its pages leave our RSS and can leave the page cache
    gc.collect()
    _drop_page_cache(dense_path)
    engine.base_bytes = footprint_bytes()
    engine.sizing = {"slot_bytes": slot_bytes, "sch_curves": sch_curves, "hotness": hotness, "options": options}
    if stack is not None:  # the stack's share: all of it if the budget leaves the smallest cache beside it
        room = None if budget is None else budget - _fixed(engine.base_bytes, budget) - _smallest_cache(engine)
        stack.resize(stack.index.n_blocks if room is None else
                     blocks_for_budget(stack.index, min(stack.index.full_bytes, room), lambda: _needs(engine, budget)))
    _size_cache(engine, budget)
    return engine


def set_memory_budget(engine: OffloadEngine, budget: int, *, reason: str = "set_memory_budget") -> dict:
    """Fit a running engine into ``budget`` bytes without reloading or losing the context: the
    BitStack stack (if any) grows or shrinks first, block by block; the expert cache is resized
    only when the stack is at its smallest (shrinking) or full (growing). Takes effect from the
    next token (waits for the one in flight). Refuses, changing nothing, when even the smallest
    stack and cache do not fit. Returns the resize record (also kept in the telemetry)."""
    stack, slot_bytes = engine.stack, engine.sizing["slot_bytes"]
    with engine.eval_lock:
        t0 = time.perf_counter()
        before = {"stack_bytes": stack.loaded_bytes if stack else 0, "cache_bytes": engine.cache_bytes}
        room = budget - _fixed(engine.base_bytes, budget)
        if room < _smallest_stack(engine) + _smallest_cache(engine):
            raise EdgeError(f"memory budget {format_bytes(budget)} is too small: {_needs(engine, budget)}")
        cache = engine.cache_bytes
        if stack is not None:
            n = stack.index.blocks_within(room - cache)
            if n < stack.index.min_blocks:  # the stack at its floor and the cache gives the rest
                stack.resize(stack.index.min_blocks)
                _size_cache(engine, budget)
            else:
                stack.resize(n)
                if n >= stack.index.n_blocks and room - stack.loaded_bytes - cache >= slot_bytes:
                    _size_cache(engine, budget)  # stack full: the cache grows
        elif room - cache < 0 or room - cache >= slot_bytes:
            _size_cache(engine, budget)
        engine.budget_bytes = budget
        record = {"unix": round(time.time(), 3), "reason": reason, "budget_bytes": budget,
                  "stack_bytes": stack.loaded_bytes if stack else 0, "stack_blocks": stack.n_loaded if stack else 0,
                  "cache_bytes": engine.cache_bytes, "seconds": round(time.perf_counter() - t0, 4),
                  "before": before}
        engine.telemetry.resizes.append(record)
    log.info("resized to budget %s (%s): stack %s -> %s, expert cache %s -> %s in %.3f s", format_bytes(budget),
             reason, format_bytes(before["stack_bytes"]), format_bytes(record["stack_bytes"]),
             format_bytes(before["cache_bytes"]), format_bytes(record["cache_bytes"]), record["seconds"])
    return record


def smallest_budget(engine: OffloadEngine) -> int:
    """The smallest budget ``engine`` runs in: what it holds, its headroom, the smallest expert
    cache (K experts per layer) and, with a stack, one block per matrix."""
    return _budget_holding(engine, _smallest_cache(engine) + _smallest_stack(engine))


def budget_for_stack(engine: OffloadEngine, stack_bytes: int) -> int:
    """The budget that leaves ``stack_bytes`` for the stack beside the current expert cache."""
    return _budget_holding(engine, engine.cache_bytes + stack_bytes)


def _budget_holding(engine: OffloadEngine, nbytes: int) -> int:
    """The smallest budget whose room beside the engine and its headroom (``_fixed``) is ``nbytes``."""
    return int((engine.base_bytes + MARGIN_BYTES + nbytes) / (1 - MARGIN_FRACTION)) + 1


def _smallest_cache(engine: OffloadEngine) -> int:
    return engine.spec.n_layers * engine.spec.top_k * engine.sizing["slot_bytes"]


def _smallest_stack(engine: OffloadEngine) -> int:
    return engine.stack.index.bytes_at(engine.stack.index.min_blocks) if engine.stack else 0


def _fixed(base: int, budget: int | None) -> int:
    return base + MARGIN_BYTES + int(MARGIN_FRACTION * (budget or 0))


def _needs(engine: OffloadEngine, budget: int | None) -> str:
    spec = engine.spec
    return (f"the engine holds {format_bytes(engine.base_bytes)} plus headroom {format_bytes(_fixed(0, budget))}, "
            f"the smallest expert cache ({spec.n_layers} layers x {spec.top_k}) {format_bytes(_smallest_cache(engine))}"
            + (f" and the smallest stack {format_bytes(_smallest_stack(engine))}" if engine.stack else ""))


def _size_cache(engine: OffloadEngine, budget: int | None) -> None:
    """(Re)size the expert cache for ``budget`` beside the engine, its headroom and the loaded stack."""
    spec, z = engine.spec, engine.sizing
    fixed = _fixed(engine.base_bytes, budget) + (engine.stack.loaded_bytes if engine.stack else 0)
    o = z["options"]
    slots, bits = offload_plan(
        n_layers=spec.n_layers, n_experts=spec.n_experts, top_k=spec.top_k, slot_bytes=z["slot_bytes"],
        budget_bytes=budget, fixed_bytes=fixed, sch_curves=z["sch_curves"], hotness=z["hotness"], bits=o.bits,
        min_bits=o.min_bits, pin_bits=o.pin_bits)
    if tuple(slots) != tuple(engine.config.slots):
        engine.set_cache(slots, bits)
    if budget is not None:
        engine.budget_bytes = budget
        engine.fixed_bytes = fixed


def _drop_page_cache(path: Path) -> None:
    """The dense file was read through the page cache while quantizing; give those pages back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

