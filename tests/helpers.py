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


def offload_and_reference_perplexity(bundle, default_dir, *, windows: int = 4, window: int = 128):
    """Held-out perplexity of an offload bundle (4-bit experts pinned) and of the f32 reference engine
    on the default checkpoint, over the same ``windows`` x ``window`` tokens: (ours, reference)."""
    import edge
    from edge.data.corpus import stdlib_corpus
    from edge.formats.hf import load_weights
    from edge.runtime.perplexity import perplexity
    from edge.runtime.reference import ReferenceEngine
    from edge.sdk import OffloadOptions

    with edge.load(bundle, offload=OffloadOptions(pin_bits=True)) as m:
        ids = m.tokenize(stdlib_corpus().heldout_texts()[3])[: windows * window + 1]

        def logits(chunk):
            m.backend.truncate(0)
            return m.backend.eval(chunk, all_logits=True)

        ours = perplexity(logits, ids, window=window)
    weights = load_weights(default_dir)
    ref = perplexity(lambda c: ReferenceEngine(weights, n_ctx=2 * window).eval(c, all_logits=True), ids, window=window)
    return ours, ref
