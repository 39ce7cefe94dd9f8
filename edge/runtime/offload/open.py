"""Opening the offload engine on an offload bundle (dense weights + nested expert store) or on a GGUF
file as it is (its trunk copied in its own types, its experts read from the file), with the
expert cache the caller asked for.

The cache is either exactly the slots given (a deployed bundle's plan: the plan is what runs, and
a plan that does not fit beside what this process holds is refused, not quietly resized) or sized
from the memory budget with the same sizing functions the planner predicts with.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.formats import edge_weights
from edge.memory import footprint_bytes
from edge.moe.sizing import bit_table, headroom_bytes
from edge.quant.stack import LoadedStack, StackIndex, blocks_for_budget
from edge.quant.store import StoreIndex
from edge.runtime.offload import trunk as trunks
from edge.runtime.offload.budget import cache_bytes_for, needs_text, size_cache, smallest_cache
from edge.runtime.offload.engine import OffloadConfig, OffloadEngine
from edge.runtime.offload.experts import ExpertSource, GGUFExperts, NestedExperts, expert_tensors
from edge.runtime.offload.options import OffloadOptions
from edge.runtime.offload.store import ExpertStore
from edge.units import format_bytes

log = logging.getLogger(__name__)


def open_offload(bundle: Path, manifest, *, budget: int | None, options: OffloadOptions, n_ctx: int,
                 threads: int) -> OffloadEngine:
    """An engine on ``bundle`` (its manifest read by the caller). ``options`` must be resolved
    (every field set); ``options.slots`` None sizes the cache from ``budget``."""
    spec = manifest.spec
    index = StoreIndex.from_dict(manifest.experts)
    stack = None
    if (bundle / "dense.gguf").is_file():  # streamed bundles: the trunk at the engine's precision already
        trunk = trunks.load_gguf_trunk(bundle / "dense.gguf", spec)
    else:  # bundles of float dense weights (BitStack bundles, and bundles of earlier versions)
        dense_path = bundle / "dense.safetensors"
        dense = edge_weights.load(dense_path, spec, experts=False, stacked=manifest.bitstack is not None)
        if manifest.bitstack is not None:
            stack = LoadedStack(bundle / "dense.stack", StackIndex.from_dict(manifest.bitstack))
        where = {(m[0], m[1]): j for j, m in enumerate(stack.index.matrices)} if stack else {}
        trunk = trunks.from_weights(dense, where)
        del dense  # unmaps the float32 file: its pages leave our RSS and can leave the page cache
        gc.collect()
        _drop_page_cache(dense_path)
    experts = NestedExperts(ExpertStore(bundle / "experts.bin", index, mode=options.io_mode), prefetch=options.prefetch)
    return _start(trunk, experts, manifest.locality or {}, stack, budget=budget, options=options, n_ctx=n_ctx,
                  threads=threads, name=manifest.name)


def open_gguf(path: Path, *, budget: int | None, options: OffloadOptions, n_ctx: int, threads: int,
              locality: dict | None = None) -> OffloadEngine:
    """An engine on a MoE GGUF as it is: the trunk's tensors copied in their own types, the experts
    read from the file into the cache. ``locality``: SCH curves of routing recorded on earlier runs
    (the cache is spread over the layers by them; uniform without)."""
    from edge.formats.gguf_read import open_reader, read_spec

    reader = open_reader(path)
    spec = read_spec(path, reader)
    experts = GGUFExperts(path, expert_tensors(path, reader, spec), mode=options.io_mode)
    del reader
    try:
        trunk = trunks.load_gguf_trunk(path, spec)
    except BaseException:
        experts.close()
        raise
    return _start(trunk, experts, locality or {}, None, budget=budget, options=options, n_ctx=n_ctx, threads=threads,
                  name=Path(path).stem)


def _start(trunk, experts: ExpertSource, loc: dict, stack, *, budget, options, n_ctx, threads, name) -> OffloadEngine:
    spec = trunk.spec
    hotness = np.asarray(loc["hotness"]) if "hotness" in loc else None
    bits = bit_table(spec.n_layers, spec.n_experts, options.bits, options.min_bits, hotness)
    if options.slots is not None and len(options.slots) != spec.n_layers:
        raise EdgeError(f"the cache has {len(options.slots)} layers of slots; {name} has {spec.n_layers} layers")
    # Build the engine with an empty cache (and no stack blocks) first, measure what the process
    # then holds, and size the stack and the cache from the rest of the budget.
    config = OffloadConfig(slots=(0,) * spec.n_layers, bits=bits, policy=options.policy,
                           prefetch=options.prefetch, threads=threads, io_mode=options.io_mode)
    engine = OffloadEngine(trunk, experts, config, n_ctx=n_ctx, stack=stack)
    gc.collect()
    engine.base_bytes = footprint_bytes()
    sch = np.asarray(loc["sch"]) if "sch" in loc else None
    engine.sizing = {"slot_bytes": [experts.slot_bytes(i) for i in range(spec.n_layers)], "sch_curves": sch}
    if options.slots is not None:
        _planned_cache(engine, options.slots, bits, budget)
        return engine
    if stack is not None:  # the stack's share: all of it if the budget leaves the smallest cache beside it
        room = None if budget is None else budget - engine.base_bytes - headroom_bytes(budget) - smallest_cache(engine)
        stack.resize(stack.index.n_blocks if room is None else
                     blocks_for_budget(stack.index, min(stack.index.full_bytes, room), lambda: needs_text(engine, budget)))
    size_cache(engine, budget)
    return engine


def _planned_cache(engine: OffloadEngine, slots: tuple[int, ...], bits: np.ndarray, budget: int | None) -> None:
    """Exactly the planned slots; refused with the numbers if they do not fit the budget here."""
    spec = engine.spec
    if any(c < spec.top_k or c > spec.n_experts for c in slots):
        raise EdgeError(f"planned cache slots {list(slots)} must each be {spec.top_k}..{spec.n_experts} "
                        f"(top-{spec.top_k} of {spec.n_experts} experts)")
    if engine.stack is not None:
        engine.stack.resize(engine.stack.index.n_blocks)
    need = cache_bytes_for(engine, slots)
    if budget is not None:
        held = engine.base_bytes + (engine.stack.loaded_bytes if engine.stack else 0)
        if held + headroom_bytes(budget) + need > budget:
            raise EdgeError(
                f"the planned expert cache ({sum(slots)} slots, {format_bytes(need)}) does not fit the "
                f"{format_bytes(budget)} budget here: this process already holds {format_bytes(held)} and keeps "
                f"{format_bytes(headroom_bytes(budget))} headroom; plan again on this device (edge deploy) or pass "
                f"--memory-budget to size the cache from a budget")
        engine.budget_bytes, engine.fixed_bytes = budget, held + headroom_bytes(budget)
    engine.set_cache(slots, bits)


def _drop_page_cache(path: Path) -> None:
    """The dense file was read through the page cache while quantizing; give those pages back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
