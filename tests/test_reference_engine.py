"""The numpy reference engine against transformers' implementation of the same checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from edge.formats.hf import load_weights
from edge.runtime.reference import ReferenceEngine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _transformers_logits(model_dir, ids) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_default_model_logits_match_transformers(default_dir, heldout_ids):
    assert len(heldout_ids) == 64
    ref = _transformers_logits(default_dir, heldout_ids)
    ours = ReferenceEngine(load_weights(default_dir)).eval(heldout_ids, all_logits=True)
    assert ours.shape == ref.shape == (64, 4096)
    assert np.abs(ours - ref).max() < 1e-3


def test_incremental_decoding_equals_one_pass(default_dir, heldout_ids):
    weights = load_weights(default_dir)
    full = ReferenceEngine(weights).eval(heldout_ids, all_logits=True)
    eng = ReferenceEngine(weights)
    steps = [eng.eval(heldout_ids[:40])]
    steps += [eng.eval([t]) for t in heldout_ids[40:]]
    np.testing.assert_allclose(np.stack(steps), full[39:], atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen3"])
def test_qwen_moe_logits_match_transformers(fixture, request, heldout_ids):
    model_dir = request.getfixturevalue(fixture)
    ref = _transformers_logits(model_dir, heldout_ids)
    ours = ReferenceEngine(load_weights(model_dir)).eval(heldout_ids, all_logits=True)
    assert np.abs(ours - ref).max() < 1e-3


def test_routing_decisions_are_observable(default_dir, heldout_ids):
    eng = ReferenceEngine(load_weights(default_dir))
    seen = []
    eng.route_observers.append(lambda layer, ids, w: seen.append((layer, ids.copy(), w.copy())))
    eng.eval(heldout_ids[:10])
    eng.eval(heldout_ids[10:11])
    assert [layer for layer, _, _ in seen] == [0, 1, 2, 3, 0, 1, 2, 3]
    for layer, ids, w in seen:
        assert ids.shape == w.shape and ids.shape[1] == 2
        assert ((0 <= ids) & (ids < 8)).all() and (ids[:, 0] != ids[:, 1]).all()
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)  # Mixtral renormalises top-2
    # With 10 tokens, a trained router spreads them over more than one expert per layer.
    assert all(len(np.unique(ids)) > 2 for _, ids, _ in seen[:4])
