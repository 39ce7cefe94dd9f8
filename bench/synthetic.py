"""A synthetic Mixtral-architecture MoE large enough to not fit: the offload benchmark's model.

    python bench/synthetic.py --out /tmp/edge-bench/synth    # a Hugging Face checkpoint folder (f16)

Random weights (std 0.02, seeded), routing from the model's own random router, the default
model's tokenizer. Default shape: 16 layers, hidden 1024, 8 heads / 2 kv heads, 16 experts,
top-2, expert FFN 2816: 2.21 G expert parameters, 1.16 GiB of experts at Q4_0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.formats.weights import LayerWeights, ModelWeights  # noqa: E402
from edge.models import default_model_path  # noqa: E402
from edge.spec import ModelSpec  # noqa: E402


def synthetic_weights(*, layers=16, hidden=1024, heads=8, kv_heads=2, experts=16, top_k=2, ffn=2816,
                      vocab=4096, seed=0) -> ModelWeights:
    rng = np.random.default_rng(seed)
    hd = hidden // heads

    def w(*shape, std=0.02):  # float16 keeps 2.2 G parameters at 4.4 GB
        out = np.empty(shape, dtype=np.float16)
        flat = out.reshape(-1)
        step = 1 << 24
        for i in range(0, flat.size, step):
            flat[i : i + step] = rng.standard_normal(min(step, flat.size - i), dtype=np.float32) * std
        return out

    ones = np.ones(hidden, dtype=np.float32)
    n_exp = layers * experts * 3 * hidden * ffn
    n_dense = 2 * vocab * hidden + hidden + layers * (2 * hidden + hidden * hd * (2 * heads + 2 * kv_heads) + experts * hidden)
    spec = ModelSpec(arch="mixtral", n_layers=layers, hidden_size=hidden, n_heads=heads, n_kv_heads=kv_heads,
                     head_dim=hd, n_experts=experts, top_k=top_k, expert_ffn_size=ffn, n_shared_experts=0,
                     shared_expert_ffn_size=0, vocab_size=vocab, context_length=4096, rope_theta=10000.0,
                     rms_norm_eps=1e-5, norm_topk_prob=True, attn_bias=False, qk_norm=False,
                     tied_embeddings=False, dense_params=n_dense, expert_params=n_exp,
                     dense_bytes=2 * n_dense, expert_bytes=2 * n_exp, weight_dtype="F16", source_format="hf")
    blocks = [LayerWeights(
        attn_norm=ones, wq=w(heads * hd, hidden), wk=w(kv_heads * hd, hidden), wv=w(kv_heads * hd, hidden),
        wo=w(hidden, heads * hd), ffn_norm=ones, router=w(experts, hidden, std=0.5).astype(np.float32),
        gate=w(experts, ffn, hidden), up=w(experts, ffn, hidden), down=w(experts, hidden, ffn),
    ) for _ in range(layers)]
    return ModelWeights(spec=spec, embed=w(vocab, hidden, std=1.0), norm=ones, lm_head=w(vocab, hidden), layers=blocks)


def save_hf(weights: ModelWeights, out: Path) -> None:
    """Write the weights as a Hugging Face Mixtral checkpoint (f16 safetensors, published layout)."""
    import json
    import shutil

    from safetensors.numpy import save_file

    s = weights.spec
    f16 = lambda a: np.ascontiguousarray(a, dtype=np.float16)  # noqa: E731
    t = {"model.embed_tokens.weight": f16(weights.embed), "model.norm.weight": f16(weights.norm),
         "lm_head.weight": f16(weights.lm_head)}
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}"
        t |= {f"{p}.input_layernorm.weight": f16(lw.attn_norm), f"{p}.post_attention_layernorm.weight": f16(lw.ffn_norm),
              f"{p}.self_attn.q_proj.weight": f16(lw.wq), f"{p}.self_attn.k_proj.weight": f16(lw.wk),
              f"{p}.self_attn.v_proj.weight": f16(lw.wv), f"{p}.self_attn.o_proj.weight": f16(lw.wo),
              f"{p}.block_sparse_moe.gate.weight": f16(lw.router)}
        for e in range(s.n_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t |= {f"{q}.w1.weight": f16(lw.gate[e]), f"{q}.w3.weight": f16(lw.up[e]), f"{q}.w2.weight": f16(lw.down[e])}
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "model.safetensors"))
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": s.vocab_size,
              "hidden_size": s.hidden_size, "intermediate_size": s.expert_ffn_size, "num_hidden_layers": s.n_layers,
              "num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads, "num_local_experts": s.n_experts,
              "num_experts_per_tok": s.top_k, "max_position_embeddings": s.context_length, "rope_theta": s.rope_theta,
              "rms_norm_eps": s.rms_norm_eps, "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 0, "eos_token_id": 0, "sliding_window": None, "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(default_model_path() / "tokenizer.json", out / "tokenizer.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/edge-bench/synth"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=16)
    args = ap.parse_args()
    t0 = time.time()
    save_hf(synthetic_weights(layers=args.layers, experts=args.experts), args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**30:.2f} GiB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
