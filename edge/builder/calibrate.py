"""Calibration: route text through the offload engine itself to measure a model's locality.

The engine runs the bundle being built with one cache slot per layer (each expert is loaded,
computed and dropped, so memory stays at the trunk plus one expert per layer whatever the model's
size), records every token's experts in every layer, and the residual stream where its
prefetcher guesses the next layer's experts, from which the prefetcher's guesses are replayed.
No float32 copy of the model is ever made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge.data.corpus import EOT, stdlib_corpus, token_stream
from edge.errors import EdgeError
from edge.moe.trace import RoutingTrace, record_trace
from edge.runtime.offload.prefetch import prefetch_guess

CALIBRATION_TOKENS = 2048
WINDOW = 512  # tokens per independent context, as perplexity is measured
BATCH = 64  # tokens per forward pass: the engine's scratch for a batch's MoE layer grows with it


def calibration_tokens(encode: Callable[[str], list[int]], text: Path | None = None,
                       n: int = CALIBRATION_TOKENS) -> list[int]:
    """The first ``n`` tokens of ``text`` (a UTF-8 file), or of the stdlib training split (real
    text every machine has, documents joined by the end-of-text token)."""
    if text is not None:
        try:
            ids = encode(Path(text).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise EdgeError(f"--calibration {text}: {e.strerror or e}") from None
        if len(ids) < 2 * 16:
            raise EdgeError(f"--calibration {text} holds {len(ids)} tokens; locality needs at least 32")
        return ids[:n]
    texts = stdlib_corpus().train_texts()[:40]
    eot = encode(EOT)
    return token_stream(encode, texts, eot[0] if len(eot) == 1 else 0)[:n]


def engine_routing(engine, tokens: Sequence[int], *, window: int = WINDOW,
                   progress: Callable[[int, int], None] | None = None) -> tuple[RoutingTrace, list[np.ndarray]]:
    """The engine's routing of ``tokens`` in windows of ``window`` (each from a fresh context) and,
    per layer, the prefetcher's guess for every token [T, K]."""
    s = engine.spec
    guesses: list[list[list[int]]] = [[] for _ in range(s.n_layers)]

    def on_stream(i: int, x: np.ndarray) -> None:
        if i < s.n_layers:
            lw = engine.layers[i]
            guesses[i] += [prefetch_guess(x[t : t + 1], lw.ffn_norm, lw.router, s.rms_norm_eps, s.top_k)
                           for t in range(len(x))]

    trace = record_trace(engine, tokens, window=window, progress=progress, on_stream=on_stream, source="calibration")
    return trace, [np.asarray(g) for g in guesses]
