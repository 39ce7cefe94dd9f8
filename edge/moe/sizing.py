"""From a memory budget to an offload configuration: slots per layer and bits per expert.

Pure: takes numbers, returns numbers, refuses impossible budgets with the numbers."""

from __future__ import annotations

import numpy as np

from edge.errors import EdgeError
from edge.moe.cache import allocate_slots, hebf_bits
from edge.units import format_bytes


def slots_for(total_slots: int, n_layers: int, n_experts: int, top_k: int,
              sch_curves: np.ndarray | None) -> tuple[int, ...]:
    """Spread ``total_slots`` cache slots over the layers by their SCH curves (uniform routing
    without them). The engine sizes its caches with this, and the planner predicts with it."""
    total = min(total_slots, n_layers * n_experts)
    curves = np.asarray(sch_curves) if sch_curves is not None else np.tile(
        np.arange(1, n_experts + 1) / n_experts, (n_layers, 1))  # no locality data: uniform
    return tuple(allocate_slots(curves, top_k, int(total), target=1.0))


def offload_plan(*, n_layers: int, n_experts: int, top_k: int, slot_bytes: int, budget_bytes: int | None,
                 fixed_bytes: int, sch_curves: np.ndarray | None, hotness: np.ndarray | None,
                 bits: int, min_bits: int, pin_bits: bool) -> tuple[tuple[int, ...], np.ndarray]:
    """(slots per layer, bits [L, E]).

    ``fixed_bytes`` is what the process holds besides the expert cache (measured: interpreter,
    dense weights, KV cache, I/O buffers). Without a budget every expert gets a slot."""
    if budget_bytes is None:
        slots = (n_experts,) * n_layers
    else:
        room = budget_bytes - fixed_bytes
        need = n_layers * top_k * slot_bytes
        if room < need:
            raise EdgeError(
                f"memory budget {format_bytes(budget_bytes)} is too small: the model's dense weights and "
                f"runtime take {format_bytes(fixed_bytes)}, and {n_layers} layers x {top_k} experts need "
                f"{format_bytes(need)} more")
        slots = slots_for(int(room // slot_bytes), n_layers, n_experts, top_k, sch_curves)
    if pin_bits or hotness is None:
        bit_table = np.full((n_layers, n_experts), bits, dtype=np.int64)
    else:
        bit_table = hebf_bits(np.asarray(hotness), bits, min_bits, share_at_max=0.5)
    return slots, bit_table
