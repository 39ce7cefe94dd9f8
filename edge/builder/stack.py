"""Building the BitStack stack of a model's attention matrices (needs torch: the ``convert`` extra).

Calibration text runs through the reference engine; every attention matrix's input activations
give its activation scales (BitStack's activation-aware scaling), then each matrix is decomposed
into ``n_blocks`` sign x rank-k blocks and all blocks are ordered into one stack by the error
proxy (:func:`edge.quant.bitstack.order_by_error`; docs/bitstack.md compares it with a
loss-guided ordering). Routed experts are not stacked: they are the nested-bit expert store's job.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from edge.formats.weights import ModelWeights
from edge.quant.bitstack import BLOCKS_DEFAULT, K_DEFAULT, activation_scales, block_bytes, decompose, order_by_error
from edge.quant.stack import StackIndex, write_stack
from edge.runtime.reference import ReferenceEngine

STACK_FIELDS = ("wq", "wk", "wv", "wo")  # the dense matrices of every layer that a stack holds


def input_scales(weights: ModelWeights, tokens: list[int], window: int = 512) -> dict[tuple[int, str], np.ndarray]:
    """Activation scales of every attention matrix's input, from ``tokens`` in windows of
    ``window`` (the L2 norm over a window's tokens, averaged over windows). Keys (layer, "wq")
    for q, k and v (one shared input) and (layer, "wo")."""
    engine = ReferenceEngine(weights, n_ctx=window)
    seen: dict[tuple[int, str], list[np.ndarray]] = defaultdict(list)
    engine.input_observers.append(lambda i, name, x: seen[(i, name)].append(activation_scales(x)))
    for start in range(0, max(1, len(tokens) - 1), window):
        engine.truncate(0)
        engine.eval(tokens[start : start + window])
    return {key: np.mean(v, axis=0).astype(np.float32) for key, v in seen.items()}


def build_stack(weights: ModelWeights, tokens: list[int], path: Path, *, k: int = K_DEFAULT,
                n_blocks: int = BLOCKS_DEFAULT, say: Callable[[str], None] = lambda msg: None) -> StackIndex:
    """Decompose every layer's attention matrices and write the ordered stack to ``path``."""
    say("BitStack: activation scales from calibration text")
    scales_in = input_scales(weights, tokens)
    total = len(weights.layers) * len(STACK_FIELDS)
    mats = ((i, name, np.asarray(getattr(lw, name), dtype=np.float32), scales_in[(i, "wo" if name == "wo" else "wq")])
            for i, lw in enumerate(weights.layers) for name in STACK_FIELDS)
    return decompose_to_stack(mats, path, k=k, n_blocks=n_blocks,
                              done=lambda n: say(f"BitStack: decomposed {n}/{total} matrices"))


def decompose_to_stack(mats: Iterable[tuple[int, str, np.ndarray, np.ndarray]], path: Path, *, k: int = K_DEFAULT,
                       n_blocks: int = BLOCKS_DEFAULT, done: Callable[[int], None] = lambda n: None) -> StackIndex:
    """Decompose each (layer, name, matrix, activation scales) and write all blocks to ``path`` as
    one stack in the error-proxy order; ``done(n)`` after each matrix."""
    matrices, scales, blocks, errors, nbytes = [], [], [], [], []
    for layer, name, w, s in mats:
        bl, err = decompose(w, s, n_blocks=n_blocks, k=k)
        matrices.append((layer, name, *w.shape))
        scales.append(s)
        blocks.append(bl)
        errors.append(err)
        nbytes.append(block_bytes(w.shape, bl[0].a.shape[1]))
        done(len(matrices))
    k_used = {bl[0].a.shape[1] for bl in blocks}
    if len(k_used) != 1:  # decompose clamps k to the smaller side; one stack holds one rank
        raise ValueError(f"matrices smaller than rank {k} cannot share a stack (ranks {sorted(k_used)})")
    return write_stack(path, matrices, scales, blocks, order_by_error(errors, nbytes), k_used.pop())
