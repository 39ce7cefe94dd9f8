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
MIN_BATCH = 64


def batch_for(spec) -> int:
    """Tokens per forward pass of the calibration engine. With one cache slot per layer, each pass
    reads every expert its tokens route to, so a batch of 64 read model A's whole 16 GB expert
    store once per 64 tokens (520 GB for 2048 tokens: two hours here). The pass's scratch grows
    with the batch (moe.sizing.scratch_bytes: 120 MB at 512 on model A, beside its 0.93 GiB
    trunk); the batch is the largest multiple of 64 up to WINDOW whose scratch stays within the
    float32 size of the model's largest matrix (the embedding, or one expert matrix), the unit the
    build's memory bound is stated in."""
    from edge.moe.sizing import scratch_bytes

    largest = 4 * max(spec.vocab_size * spec.hidden_size, spec.expert_ffn_size * spec.hidden_size)
    per_token = max(1, scratch_bytes(spec, 1024) - scratch_bytes(spec, 0)) / 1024
    n = int(largest // per_token) // MIN_BATCH * MIN_BATCH
    return max(MIN_BATCH, min(WINDOW, n))


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
