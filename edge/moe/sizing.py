"""Sizing expert caches: how many slots each layer gets (from its SCH curve), which bits each expert
gets (HEBF), and the headroom a budget keeps free. Pure: numbers in, numbers out.

The offload engine sizes its caches with these functions when it runs from a budget, and the
planner predicts with the very same ones, so a plan and the engine it configures agree.
"""

from __future__ import annotations

import numpy as np

# Headroom under the budget for what RSS cannot show ahead: allocator slack, Python objects,
# per-token activations, and the page cache of the code we run. Without swap, a process whose
# anonymous memory fills its cgroup makes the kernel evict and re-read its own code pages on
# every fault: measured on the synthetic benchmark model at 97% of the cap, decode slowed >10x.
MARGIN_BYTES = 48 << 20
MARGIN_FRACTION = 0.10


BATCH = 512  # prompt tokens per forward pass of the offload engine, as llama.cpp's default n_batch
LOGIT_ROWS = 64  # positions per output-matrix product when every position's logits are wanted


def scratch_bytes(spec, batch: int = BATCH) -> int:
    """The offload engine's scratch for its largest ggml graph: a batch's MoE layer (every routed
    row's input, gate, up, product and output: K x (2D + 4F) floats per token), its attention
    products, the shared expert, or LOGIT_ROWS rows of logits; plus 8 MiB for ggml's tensor and
    graph overheads and the quantized copy of the activations its kernels make. The planner counts
    it as the engine allocates it."""
    D, F, K = spec.hidden_size, spec.expert_ffn_size, spec.top_k
    moe = batch * K * (2 * D + 4 * F)
    attn = batch * ((spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim + D)
    shared = batch * (2 * D + 4 * spec.shared_expert_ffn_size)
    logits = LOGIT_ROWS * (spec.vocab_size + D)
    return 4 * max(moe, attn, shared, logits) + (8 << 20)


def headroom_bytes(budget: int | None) -> int:
    """What a budget keeps free beside everything the engine holds."""
    return MARGIN_BYTES + int(MARGIN_FRACTION * (budget or 0))


def cache_room(budget: int, held: int) -> int:
    """Bytes left for the expert cache when the process holds ``held`` bytes besides it."""
    return budget - held - headroom_bytes(budget)


def slots_for(total_slots: int, n_layers: int, n_experts: int, top_k: int,
              sch_curves: np.ndarray | None) -> tuple[int, ...]:
    """Spread ``total_slots`` cache slots over the layers by their SCH curves (uniform routing
    without them). The engine sizes its caches with this, and the planner predicts with it."""
    total = min(total_slots, n_layers * n_experts)
    curves = np.asarray(sch_curves) if sch_curves is not None else np.tile(
        np.arange(1, n_experts + 1) / n_experts, (n_layers, 1))  # no locality data: uniform
    return tuple(allocate_slots(curves, top_k, int(total), target=1.0))


def slots_within(room: int, slot_bytes: list[int], n_experts: int, top_k: int,
                 sch_curves: np.ndarray | None) -> tuple[int, ...]:
    """The most slots per layer whose bytes fit in ``room`` when layer i's slots take
    ``slot_bytes[i]`` each (a GGUF's layers may differ in type): spread by SCH as
    :func:`slots_for`, then trimmed from the fullest layers until they fit. Caller checks that K
    slots per layer fit."""
    L = len(slot_bytes)
    slots = list(slots_for(int(room // (sum(slot_bytes) / L)), L, n_experts, top_k, sch_curves))
    while sum(c * b for c, b in zip(slots, slot_bytes)) > room:
        i = max((j for j in range(L) if slots[j] > top_k), key=lambda j: (slots[j], slot_bytes[j]), default=None)
        if i is None:
            break
        slots[i] -= 1
    return tuple(slots)


def bit_table(n_layers: int, n_experts: int, bits: int, min_bits: int, hotness: np.ndarray | None) -> np.ndarray:
    """Bits [L, E] each expert loads at: ``bits`` for all when ``min_bits == bits`` or no hotness is
    known, else HEBF between ``bits`` and ``min_bits``."""
    if min_bits >= bits or hotness is None:
        return np.full((n_layers, n_experts), bits, dtype=np.int64)
    return hebf_bits(np.asarray(hotness), bits, min_bits, share_at_max=0.5)


def allocate_slots(sch_curves: np.ndarray, top_k: int, total_slots: int, target: float = 0.98) -> list[int]:
    """Cache slots per layer from each layer's SCH curve [L, E] (hit rate for C = 1..E).

    Every layer gets at least K slots (one token's experts must fit); the rest go, one at a time,
    to the layer whose hit rate gains most from one more slot, until the budget is spent or every
    layer reaches ``target`` of its full-cache hit rate (slots past that buy almost nothing)."""
    L, E = sch_curves.shape
    if total_slots < L * top_k:
        raise ValueError(f"{total_slots} slots cannot give {L} layers {top_k} each")
    slots = [min(top_k, E)] * L
    left = total_slots - sum(slots)
    while left > 0:
        gains = []
        for i in range(L):
            c = slots[i]
            done = c >= E or sch_curves[i, c - 1] >= target * sch_curves[i, -1]
            gains.append(-1.0 if done else sch_curves[i, c] - sch_curves[i, c - 1])
        # equal gains (uniform routing, or flat stretches of real curves): the layer with the fewest
        # slots first, so a tie spreads the cache instead of filling layer 0 to the brim
        best = max(range(L), key=lambda i: (round(gains[i], 9), -slots[i]))
        if gains[best] < 0:
            break
        slots[best] += 1
        left -= 1
    return slots


def hebf_bits(hotness: np.ndarray, max_bits: int, min_bits: int, share_at_max: float = 0.5) -> np.ndarray:
    """Hottest-expert-bit-first (D²MoE): per layer, the hottest experts that together take
    ``share_at_max`` of the activations get ``max_bits``; each further bit less goes to the next
    half of what remains (0.5 -> 4 bits, next 0.25 -> 3, the coldest 0.25 -> 2). Hot experts
    mostly hit the cache, so their bits cost memory, not reads; cold experts miss, so fewer bits
    there cut the bytes read where reads happen.

    hotness [L, E] (rows sum to 1) -> bits [L, E]."""
    L, E = hotness.shape
    n_levels = max_bits - min_bits + 1
    bounds, b = [], share_at_max
    for _ in range(n_levels - 1):
        bounds.append(b)
        b += (1.0 - b) / 2
    bits = np.full((L, E), min_bits, dtype=np.int64)
    for i in range(L):
        order = np.argsort(-hotness[i], kind="stable")
        before = np.cumsum(hotness[i][order]) - hotness[i][order]  # share taken by hotter experts
        for e, share in zip(order, before):
            level = int(np.searchsorted(bounds, share, side="right"))
            bits[i, e] = max_bits - min(level, n_levels - 1)
    return bits
