"""The benchmark's real-shape GGUF writer (bench/moe_gguf.py) makes what llama.cpp makes: the same
tensor types as llama.cpp's own Q4_K_M quantizer, a file llama.cpp loads, and one edge reads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import moe_gguf  # noqa: E402

SMALL = {  # 8 layers so use_more_bits picks layers 0, 3, 6, 7; rows of 256 so K-quants apply
    "qwen3": dict(arch="qwen3_moe", n_layers=8, hidden_size=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=4,
                  top_k=2, expert_ffn_size=256, vocab_size=4096, context_length=512, rope_theta=1e6,
                  rms_norm_eps=1e-6),
    "mixtral8": dict(arch="mixtral", n_layers=8, hidden_size=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                     top_k=2, expert_ffn_size=320, vocab_size=4096, context_length=512, rope_theta=1e4,
                     rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_q4_k_m_mix_is_llama_cpps(tmp_path, name):
    from edge.formats.gguf_read import open_reader
    from edge.formats.gguf_write import quantize_gguf

    f32 = moe_gguf.write_model(tmp_path / "f32.gguf", SMALL[name], mix="f32", say=lambda *a, **k: None)
    theirs = tmp_path / "llama-q4_k_m.gguf"
    quantize_gguf(f32, theirs, "q4_k_m")
    ours = moe_gguf.write_model(tmp_path / "ours.gguf", SMALL[name], say=lambda *a, **k: None)
    want = {t.name: t.tensor_type.name for t in open_reader(theirs).tensors}
    got = {t.name: t.tensor_type.name for t in open_reader(ours).tensors}
    assert got == want
    assert {"Q4_K", "Q6_K"} <= set(got.values())  # the mix, not one type


def test_llama_cpp_and_edge_run_the_written_model(tmp_path):
    import numpy as np

    from edge.runtime.llamacpp import LlamaCppBackend
    from edge.runtime.offload.open import open_gguf
    from edge.runtime.offload.options import OffloadOptions

    path = moe_gguf.write_model(tmp_path / "m.gguf", SMALL["qwen3"], say=lambda *a, **k: None)
    ll = LlamaCppBackend(path, n_ctx=128, n_threads=2)
    eng = open_gguf(path, budget=None, options=OffloadOptions().resolved(), n_ctx=128, threads=2)
    try:
        ids = list(range(5, 45))
        a, b = eng.eval(ids), ll.eval(ids)
        assert a.shape == b.shape == (4096,)
        assert int(np.argmax(a)) == int(np.argmax(b))
    finally:
        eng.close()
        ll.close()
