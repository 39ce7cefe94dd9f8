"""Decoding behaviour shared by all backends: sampling, stop strings, streaming, prompt caching."""

from __future__ import annotations

import numpy as np
import pytest

import edge
from edge.runtime.generate import Sampler, SamplingParams


@pytest.fixture(scope="module")
def model():
    with edge.load() as m:
        yield m


def _text(result) -> str:
    return result["choices"][0]["text"]


def test_completion_has_openai_shape(model):
    r = model.create_completion("def fibonacci(", max_tokens=10, temperature=0)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert r["usage"]["completion_tokens"] == 10
    assert r["usage"]["prompt_tokens"] == len(model.tokenize("def fibonacci("))
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 10


def test_same_seed_same_text_other_seed_other_text(model):
    a = [_text(model.create_completion("import ", max_tokens=24, seed=s, temperature=1.0)) for s in (1, 1, 2)]
    assert a[0] == a[1]
    assert a[0] != a[2]


def test_stop_string_cuts_the_text(model):
    full = _text(model.create_completion("def fibonacci(", max_tokens=40, temperature=0))
    stop = full[5:8]
    assert stop and stop in full
    r = model.create_completion("def fibonacci(", max_tokens=40, temperature=0, stop=[stop])
    assert _text(r) == full[: full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_streaming_pieces_join_to_the_full_text(model):
    full = _text(model.create_completion("class ", max_tokens=30, seed=5))
    chunks = list(model.create_completion("class ", max_tokens=30, seed=5, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks) > 3


def test_streaming_with_stop_string_never_leaks_it(model):
    full = _text(model.create_completion("def ", max_tokens=40, temperature=0))
    stop = full[10:14]
    chunks = list(model.create_completion("def ", max_tokens=40, temperature=0, stop=stop, stream=True))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == full[: full.index(stop)] and stop not in text


def test_prompt_cache_reuse_gives_the_same_text(model):
    first = _text(model.create_completion("import os\nimport sys\n", max_tokens=12, temperature=0))
    _ = model.create_completion("import os\n", max_tokens=5, temperature=0)  # shares a prefix
    again = _text(model.create_completion("import os\nimport sys\n", max_tokens=12, temperature=0))
    assert again == first


def test_sampler_greedy_top_k_and_top_p():
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams(temperature=0))(logits) == 1
    picks = {Sampler(SamplingParams(temperature=1.0, top_k=1, seed=s))(logits) for s in range(20)}
    assert picks == {1}
    picks = {Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=s))(logits) for s in range(20)}
    assert picks == {1}  # token 1 alone holds > 50% of the mass
    picks = {Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=s))(logits) for s in range(50)}
    assert picks == {1, 2}


def test_invalid_sampling_options_are_user_errors(model):
    with pytest.raises(edge.EdgeError, match="top_p"):
        model.create_completion("x", top_p=0)
    with pytest.raises(edge.EdgeError, match="prompt is empty"):
        model.create_completion("", max_tokens=3)


def test_backends_agree_through_the_sdk(default_dir):
    with edge.load(default_dir, backend="llamacpp") as llama, edge.load(default_dir, backend="reference") as ref:
        a = _text(llama.create_completion("def fibonacci(", max_tokens=32, temperature=0))
        b = _text(ref.create_completion("def fibonacci(", max_tokens=32, temperature=0))
    assert a == b


def test_offload_backend_needs_an_offload_bundle(default_dir):
    with pytest.raises(edge.EdgeError, match="offload bundles"):
        edge.load(default_dir, backend="offload")
    with pytest.raises(edge.EdgeError, match="offload bundles"):
        edge.load(default_dir, memory_budget="1GB")
