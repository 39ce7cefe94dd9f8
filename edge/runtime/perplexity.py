"""Perplexity of a backend on a token stream, in independent windows (as the training script does)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# A function that takes a window of tokens and returns logits [T, V] for every position.
AllLogits = Callable[[Sequence[int]], np.ndarray]


def perplexity(all_logits: AllLogits, ids: Sequence[int], *, window: int = 256,
               progress: Callable[[int, int], None] | None = None) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of ``window`` + 1 tokens;
    each window is scored from a fresh context, predicting tokens 2..window+1 from their prefixes."""
    ids = np.asarray(ids, dtype=np.int64)
    n = (len(ids) - 1) // window
    if n < 1:
        raise ValueError(f"need more than {window} tokens, got {len(ids)}")
    nll, count = 0.0, 0
    for i in range(n):
        chunk = ids[i * window : i * window + window + 1]
        logits = all_logits(chunk[:-1]).astype(np.float64)  # [T, V]
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((logz - logits[np.arange(window), chunk[1:]]).sum())
        count += window
        if progress:
            progress(i + 1, n)
    return math.exp(nll / count)
