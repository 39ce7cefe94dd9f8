"""llama.cpp (through our GGUF writer) decodes the same greedy tokens as the reference engine."""

from __future__ import annotations

import pytest
from helpers import greedy

from edge.formats.gguf_write import write_gguf
from edge.formats.hf import load_weights
from edge.runtime.llamacpp import LlamaCppBackend
from edge.runtime.reference import ReferenceEngine


def test_default_model_f32_greedy_parity(default_dir, default_gguf_f32, heldout_ids):
    prompt = heldout_ids[:40]
    ours = greedy(ReferenceEngine(load_weights(default_dir)), prompt, 48)
    be = LlamaCppBackend(default_gguf_f32, n_ctx=256, n_threads=2)
    try:
        theirs = greedy(be, prompt, 48)
    finally:
        be.close()
    assert len(set(ours)) > 10  # a real continuation, not one repeated token
    assert theirs == ours


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen3"])
def test_qwen_moe_gguf_greedy_parity(fixture, request, tmp_path, heldout_ids):
    model_dir = request.getfixturevalue(fixture)
    weights = load_weights(model_dir)
    gguf = tmp_path / "m.gguf"
    write_gguf(weights, model_dir / "tokenizer.json", gguf, outtype="f32", bos_id=0, eos_id=0)
    ours = greedy(ReferenceEngine(weights), heldout_ids[:8], 32)
    be = LlamaCppBackend(gguf, n_ctx=128, n_threads=2)
    try:
        assert greedy(be, heldout_ids[:8], 32) == ours
    finally:
        be.close()


def test_gguf_weights_read_back_exactly(default_dir, default_gguf_f32):
    from edge.formats import gguf_read

    a, b = load_weights(default_dir), gguf_read.load_weights(default_gguf_f32)
    for la, lb in zip(a.layers, b.layers):
        for name in ("wq", "wk", "wv", "wo", "router", "gate", "up", "down"):
            assert (getattr(la, name) == getattr(lb, name)).all(), name


def test_perplexity_agrees_across_backends_and_beats_unigram(default_dir, default_gguf_f32):
    from edge.data.corpus import stdlib_corpus
    from edge.runtime.perplexity import perplexity
    from edge.runtime.tokenizer import HFTokenizer

    ids = HFTokenizer(default_dir / "tokenizer.json").encode(stdlib_corpus().heldout_texts()[1])[: 4 * 128 + 1]
    weights = load_weights(default_dir)
    ref = perplexity(lambda c: ReferenceEngine(weights, n_ctx=256).eval(c, all_logits=True), ids, window=128)
    be = LlamaCppBackend(default_gguf_f32, n_ctx=256, n_threads=2, all_logits=True)
    try:
        def llama(c):
            be.truncate(0)
            return be.eval_all(c)

        theirs = perplexity(llama, ids, window=128)
    finally:
        be.close()
    assert abs(ref - theirs) / ref < 1e-3
    assert ref < 200  # the unigram baseline on this text is ~800 (docs/default-model.md)
