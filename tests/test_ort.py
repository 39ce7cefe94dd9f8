"""The ONNX Runtime backend on real ONNX bundles built by edge: parity with the reference engine for
every architecture edge supports (f32 export within 1e-3; int4/int8 teacher-forced top-1 agreement
>= 95% against the reference engine computing with the very weights the bundle holds), greedy text
through the SDK, a bundle from a GGUF, and the KV cache across prompts and truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edge
from edge.formats.hf import load_weights
from edge.formats.onnx_quant import as_stored
from edge.runtime.reference import ReferenceEngine

BITS = {"int4": 4, "int8": 8}


@pytest.fixture(scope="module")
def text_ids(heldout_ids) -> list[int]:
    return heldout_ids[:64]


@pytest.fixture(scope="module")
def checkpoints(default_dir, tiny_qwen2_std, tiny_qwen3_std) -> dict[str, Path]:
    return {"mixtral": default_dir, "qwen2_moe": tiny_qwen2_std, "qwen3_moe": tiny_qwen3_std}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, checkpoints) -> dict[tuple[str, str], Path]:
    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for arch, path in checkpoints.items():
        for wtype in ("f32", "int4", "int8"):
            out[arch, wtype] = root / f"{arch}-{wtype}"
            edge.build(path, out[arch, wtype], format="onnx", weight_type=wtype)
    return out


def _ort_logits(bundle: Path, ids: list[int]) -> np.ndarray:
    with edge.load(bundle) as m:
        assert m.backend_name == "ort"
        return m.backend.eval(ids, all_logits=True)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_f32_export_matches_reference(arch, checkpoints, bundles, text_ids):
    got = _ort_logits(bundles[arch, "f32"], text_ids)
    want = ReferenceEngine(load_weights(checkpoints[arch])).eval(text_ids, all_logits=True)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3


@pytest.mark.parametrize("wtype", ["int4", "int8"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_quantized_top1_agrees_with_reference_at_same_weights(arch, wtype, checkpoints, bundles, text_ids):
    got = _ort_logits(bundles[arch, wtype], text_ids)
    same = as_stored(load_weights(checkpoints[arch]), BITS[wtype], 32)
    want = ReferenceEngine(same).eval(text_ids, all_logits=True)
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    assert agree >= 0.95, f"{arch} {wtype}: top-1 agreement {agree:.3f}"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_greedy_text_through_the_sdk_is_the_reference_engines(arch, bundles, checkpoints):
    kw = dict(max_tokens=24, temperature=0)
    with edge.load(bundles[arch, "f32"]) as m:
        got = m.create_completion("def fibonacci(", **kw)["choices"][0]["text"]
        if arch == "mixtral":  # the tiny Qwen checkpoints carry no chat template
            chat = m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
            assert chat["choices"][0]["message"]["role"] == "assistant"
    with edge.load(checkpoints[arch], backend="reference") as r:
        want = r.create_completion("def fibonacci(", **kw)["choices"][0]["text"]
    assert got == want and len(got) > 10


def test_kv_cache_across_prompts_and_truncation(bundles, text_ids):
    """Chunked prefill after a cached prefix, decode steps and truncate give the logits of one
    whole pass over the same tokens."""
    whole = _ort_logits(bundles["mixtral", "f32"], text_ids[:40])
    with edge.load(bundles["mixtral", "f32"]) as m:
        be = m.backend
        be.eval(text_ids[:20])
        be.eval([1, 2, 3])  # a detour, cut away again
        be.truncate(20)
        be.eval(text_ids[20:30])
        for t in text_ids[30:39]:
            be.eval([t])
        last = be.eval([text_ids[39]])
        assert be.n_past == 40
    assert np.abs(last - whole[-1]).max() <= 1e-4


def test_bundle_from_a_gguf_runs_the_same_model(default_gguf_f32, bundles, tmp_path, text_ids):
    """A GGUF's tensors (Mixtral's Q/K rows in llama.cpp's interleaved order) exported to ONNX give
    the checkpoint's logits; its tokenizer travels as a tensor-less GGUF."""
    out = tmp_path / "from-gguf"
    manifest = edge.build(default_gguf_f32, out, format="onnx", weight_type="f32")
    assert manifest.tokenizer.kind == "gguf"
    got = _ort_logits(out, text_ids)
    want = _ort_logits(bundles["mixtral", "f32"], text_ids)
    assert np.abs(got - want).max() <= 1e-3
    with edge.load(out) as m:
        assert m.tokenizer.encode("def fibonacci(")


def test_backend_ort_exports_a_checkpoint_once(default_dir):
    with edge.load(default_dir, backend="ort") as m:
        assert m.backend_name == "ort" and "exported to an int4 ONNX bundle" in m.notes[0] and "now" in m.notes[0]
        first = m.create_completion("import os", max_tokens=8, temperature=0)["choices"][0]["text"]
    with edge.load(default_dir, backend="ort") as m:
        assert "earlier" in m.notes[0]
        assert m.create_completion("import os", max_tokens=8, temperature=0)["choices"][0]["text"] == first
