"""The offload engine's prefetcher: a guess of the next layer's experts from the residual stream."""

from __future__ import annotations

import numpy as np

from edge.runtime.reference import rms_norm


def prefetch_guess(h: np.ndarray, ffn_norm: np.ndarray, router: np.ndarray, eps: float, k: int) -> list[int]:
    """The offload prefetcher's guess of a layer's experts from the residual stream ``h`` [T, D]
    entering it: the layer's router on its normalized input, best score over the batch, top k."""

    scores = (rms_norm(h, ffn_norm, eps) @ router.T).max(axis=0)
    return [int(e) for e in np.argsort(-scores, kind="stable")[:k]]
