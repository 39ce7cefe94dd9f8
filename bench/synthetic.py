"""A synthetic Mixtral-architecture MoE large enough to not fit: the offload benchmark's model.

    python bench/synthetic.py --out /tmp/edge-bench/synth    # writes synth-f16.gguf and synth-q4_0.gguf

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

from edge.formats.gguf_write import quantize_gguf, write_gguf  # noqa: E402
from edge.models import default_model_path  # noqa: E402
from edge.runtime.weights import LayerWeights, ModelWeights  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/edge-bench/synth"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=16)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    weights = synthetic_weights(layers=args.layers, experts=args.experts)
    f16 = args.out.with_name(args.out.name + "-f16.gguf")
    write_gguf(weights, default_model_path() / "tokenizer.json", f16, outtype="f16", bos_id=0, eos_id=0,
               name="edge-synthetic-moe")
    print(f"wrote {f16} ({f16.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f}s", flush=True)
    q4 = args.out.with_name(args.out.name + "-q4_0.gguf")
    quantize_gguf(f16, q4, "q4_0")
    print(f"wrote {q4} ({q4.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
