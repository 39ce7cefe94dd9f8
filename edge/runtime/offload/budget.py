"""A running offload engine inside a memory budget: the cache sized from what the process holds, and
resizes while it runs (BitStack stack first, then the expert cache) without losing the context."""

from __future__ import annotations

import logging
import time

from edge.errors import EdgeError
from edge.moe.sizing import MARGIN_BYTES, MARGIN_FRACTION, cache_room, headroom_bytes, slots_within
from edge.units import format_bytes

log = logging.getLogger(__name__)


def cache_bytes_for(engine, slots) -> int:
    """Bytes of a cache of ``slots`` per layer (layers' slots may differ in size)."""
    return sum(c * b for c, b in zip(slots, engine.sizing["slot_bytes"]))


def set_memory_budget(engine, budget: int, *, reason: str = "set_memory_budget") -> dict:
    """Fit a running engine into ``budget`` bytes without reloading or losing the context: the
    BitStack stack (if any) grows or shrinks first, block by block; the expert cache is resized
    only when the stack is at its smallest (shrinking) or full (growing). Takes effect from the
    next token (waits for the one in flight). Refuses, changing nothing, when even the smallest
    stack and cache do not fit. Returns the resize record (also kept in the telemetry)."""
    stack, slot_bytes = engine.stack, max(engine.sizing["slot_bytes"])
    with engine.eval_lock:
        t0 = time.perf_counter()
        before = {"stack_bytes": stack.loaded_bytes if stack else 0, "cache_bytes": engine.cache_bytes}
        room = cache_room(budget, engine.base_bytes)
        if room < smallest_stack(engine) + smallest_cache(engine):
            raise EdgeError(f"memory budget {format_bytes(budget)} is too small: {needs_text(engine, budget)}")
        cache = engine.cache_bytes
        if stack is not None:
            n = stack.index.blocks_within(room - cache)
            if n < stack.index.min_blocks:  # the stack at its floor and the cache gives the rest
                stack.resize(stack.index.min_blocks)
                size_cache(engine, budget)
            else:
                stack.resize(n)
                if n >= stack.index.n_blocks and room - stack.loaded_bytes - cache >= slot_bytes:
                    size_cache(engine, budget)  # stack full: the cache grows
        elif room - cache < 0 or room - cache >= slot_bytes:
            size_cache(engine, budget)
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


def smallest_budget(engine) -> int:
    """The smallest budget ``engine`` runs in: what it holds, its headroom, the smallest expert
    cache (K experts per layer) and, with a stack, one block per matrix."""
    return _budget_holding(engine, smallest_cache(engine) + smallest_stack(engine))


def budget_for_stack(engine, stack_bytes: int) -> int:
    """The budget that leaves ``stack_bytes`` for the stack beside the current expert cache."""
    return _budget_holding(engine, engine.cache_bytes + stack_bytes)


def _budget_holding(engine, nbytes: int) -> int:
    """The smallest budget whose room beside the engine and its headroom is ``nbytes``."""
    return int((engine.base_bytes + MARGIN_BYTES + nbytes) / (1 - MARGIN_FRACTION)) + 1


def smallest_cache(engine) -> int:
    return cache_bytes_for(engine, (engine.spec.top_k,) * engine.spec.n_layers)


def smallest_stack(engine) -> int:
    return engine.stack.index.bytes_at(engine.stack.index.min_blocks) if engine.stack else 0


def needs_text(engine, budget: int | None) -> str:
    spec = engine.spec
    return (f"the engine holds {format_bytes(engine.base_bytes)} plus headroom {format_bytes(headroom_bytes(budget))}, "
            f"the smallest expert cache ({spec.n_layers} layers x {spec.top_k}) {format_bytes(smallest_cache(engine))}"
            + (f" and the smallest stack {format_bytes(smallest_stack(engine))}" if engine.stack else ""))


def size_cache(engine, budget: int | None) -> None:
    """(Re)size the expert cache for ``budget`` beside the engine, its headroom and the loaded stack:
    every expert a slot without a budget; else the slots that fit, spread over the layers by their
    SCH curves (moe.sizing.slots_for, as the planner predicts). Refuses a budget that cannot hold
    K experts per layer, with the numbers."""
    spec, z = engine.spec, engine.sizing
    held = engine.base_bytes + (engine.stack.loaded_bytes if engine.stack else 0)
    if budget is None:
        slots = (spec.n_experts,) * spec.n_layers
    else:
        room = cache_room(budget, held)
        if room < smallest_cache(engine):
            raise EdgeError(
                f"memory budget {format_bytes(budget)} is too small: the model's dense weights and runtime take "
                f"{format_bytes(held + headroom_bytes(budget))} with headroom, and {spec.n_layers} layers x "
                f"{spec.top_k} experts need {format_bytes(smallest_cache(engine))} more")
        slots = slots_within(room, z["slot_bytes"], spec.n_experts, spec.top_k, z["sch_curves"])
    if tuple(slots) != tuple(engine.config.slots):
        engine.set_cache(slots, engine.config.bits)
    if budget is not None:
        engine.budget_bytes = budget
        engine.fixed_bytes = held + headroom_bytes(budget)
