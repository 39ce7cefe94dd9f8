"""Small helpers shared by tests."""

from __future__ import annotations

import numpy as np


def greedy(backend, prompt: list[int], n: int) -> list[int]:
    logits = backend.eval(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = backend.eval([tok])
    return out
