"""MoE GGUFs of real models' exact shapes, with random weights, quantized by ggml's own code.

    python bench/moe_gguf.py --shape A --out /tmp/edge-realshape/A-q4_k_m.gguf

Shapes: A is Qwen3-30B-A3B (48 layers, 128 experts, top-8, hidden 2048, expert FFN 768, 32 query
/ 4 KV heads of 128, vocab 151,936); B is OLMoE-1B-7B's (16 layers, 64 experts, top-8, hidden
2048, FFN 1024, 16 heads, vocab 50,304) written as qwen3moe, which llama.cpp and edge both run;
C is a shape no constant was tuned to (Mixtral architecture, 12 layers, 16 experts, top-2,
hidden 1536, FFN 4096, 12 heads / 4 KV heads, vocab 32,000), for the planner's untuned error.

Every tensor is written one at a time (edge.formats.gguf_stream): random values (std 0.02; the
embedding std 1.0 and the router std 0.5, so the router routes by token as bench/synthetic.py's
does; the projections into the residual stream, attn_output and ffn_down_exps, 0.02 / sqrt(2 x
layers) as GPT-2's initialisation scales them: at 0.02 the model is chaotic at hidden 2048 -- on B
llama.cpp agreed with itself, batched against one token at a time, on only 78% of top-1 tokens,
KL 0.0035 nats, which made agreement with llama.cpp a measure of that noise), quantized with ``ggml_quantize_chunk`` at the type llama.cpp's Q4_K_M mix gives that tensor
(:func:`q4_k_m_type`, checked against llama.cpp's own quantizer in tests/test_moe_gguf.py), expert
by expert, in 2 threads. Memory: one 3-D expert tensor's quantized bytes plus a 64 M-value pool of
random floats; model A (17 GiB) takes ~30 min here, B (4 GiB) ~6 min. The tokenizer is the default
model's byte-level BPE, its token list padded to the shape's vocabulary with unused tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.formats.gguf_stream import GGUF_ARCH, TensorPlan, add_model_metadata, write_streaming  # noqa: E402
from edge.models import default_model_path  # noqa: E402
from edge.runtime import ggml  # noqa: E402
from edge.spec import ModelSpec  # noqa: E402

SHAPES = {
    "A": dict(arch="qwen3_moe", n_layers=48, hidden_size=2048, n_heads=32, n_kv_heads=4, head_dim=128, n_experts=128,
              top_k=8, expert_ffn_size=768, vocab_size=151936, context_length=40960, rope_theta=1e6, rms_norm_eps=1e-6),
    "B": dict(arch="qwen3_moe", n_layers=16, hidden_size=2048, n_heads=16, n_kv_heads=16, head_dim=128, n_experts=64,
              top_k=8, expert_ffn_size=1024, vocab_size=50304, context_length=4096, rope_theta=1e4, rms_norm_eps=1e-5),
    "C": dict(arch="mixtral", n_layers=12, hidden_size=1536, n_heads=12, n_kv_heads=4, head_dim=128, n_experts=16,
              top_k=2, expert_ffn_size=4096, vocab_size=32000, context_length=8192, rope_theta=1e6, rms_norm_eps=1e-5),
}
NAMES = {"A": "qwen3-30b-a3b-shape", "B": "olmoe-1b-7b-shape", "C": "untuned-mixtral-shape"}
POOL = 64 << 20  # random floats drawn once; each matrix is a window of it at its own offset


def spec_of(shape: dict) -> ModelSpec:
    """A ModelSpec for a shape (sizes of the trunk and experts in parameters, at 2 bytes each)."""
    s = dict(shape)
    D, L, E, F, V = s["hidden_size"], s["n_layers"], s["n_experts"], s["expert_ffn_size"], s["vocab_size"]
    q, kv = s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    qk_norm = s["arch"] == "qwen3_moe"
    dense = 2 * V * D + D + L * (2 * D + D * (2 * q + 2 * kv) + E * D + (2 * s["head_dim"] if qk_norm else 0))
    experts = L * E * 3 * D * F
    return ModelSpec(n_shared_experts=0, shared_expert_ffn_size=0, norm_topk_prob=True, attn_bias=False,
                     qk_norm=qk_norm, tied_embeddings=False, dense_params=dense, expert_params=experts,
                     dense_bytes=2 * dense, expert_bytes=2 * experts, weight_dtype="Q4_K_M", source_format="gguf", **s)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for the layers that get more bits in the _M mixes (llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(name: str, n_layers: int, n_experts: int, cols: int) -> str:
    """The ggml type llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M gives a tensor of these models
    (llama-quant.cpp: vectors and routers stay F32, the output Q6_K, attn_v and ffn_down Q6_K in
    use_more_bits layers, K and V at Q8_0 / the attention output Q5_K for 8-expert models, Q4_K
    elsewhere; rows not a multiple of 256 fall back as llama.cpp falls back)."""
    if name.endswith(("_norm.weight", ".bias")) or "ffn_gate_inp" in name:
        return "F32"
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        t = "Q6_K"
    elif name.endswith("attn_v.weight"):
        t = "Q8_0" if n_experts == 8 else "Q6_K" if use_more_bits(layer, n_layers) else "Q4_K"
    elif name.endswith("attn_k.weight") and n_experts == 8:
        t = "Q8_0"
    elif name.endswith("attn_output.weight") and n_experts == 8:
        t = "Q5_K"
    elif "ffn_down" in name:
        t = "Q6_K" if use_more_bits(layer, n_layers) else "Q4_K"
    else:
        t = "Q4_K"
    if t != "Q8_0" and cols % 256:  # llama.cpp's fallback for rows that are not whole K-quant blocks
        t = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}[t]
    return t


class Weights:
    """Random matrices from one pool of standard normals: matrix k is the pool from its own offset."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(POOL + (16 << 20), dtype=np.float32)

    def matrix(self, n: int, std: float, out: np.ndarray | None = None) -> np.ndarray:
        if n > POOL:
            return self.rng.standard_normal(n, dtype=np.float32) * std
        start = int(self.rng.integers(0, len(self.pool) - n))
        if out is None:
            return self.pool[start : start + n] * std
        np.multiply(self.pool[start : start + n], std, out=out[:n])
        return out[:n]


def quantize(values: np.ndarray, rows: int, cols: int, tname: str, out: np.ndarray, at: int) -> None:
    if values.dtype != np.float32 or not values.flags.c_contiguous:  # ggml reads the buffer as C float32
        raise TypeError(f"quantize needs contiguous float32 values, got {values.dtype}")
    gtype = ggml.type_id(tname)
    base, _ = ggml._load()
    if tname == "F32":
        out[at : at + values.nbytes] = values.view(np.uint8)
        return
    nbytes = ggml.row_bytes(gtype, cols) * rows
    view = out[at : at + nbytes]
    base.ggml_quantize_chunk(gtype, values.ctypes.data, view.ctypes.data, 0, rows, cols, None)


def plans(s: ModelSpec, seed: int, threads: int, mix: str = "q4_k_m") -> list[TensorPlan]:
    """Every tensor of the model in llama.cpp's order of names, with a producer of its bytes."""
    w = Weights(seed)
    pool = ThreadPoolExecutor(threads)
    D, F, E, L = s.hidden_size, s.expert_ffn_size, s.n_experts, s.n_layers
    q, kv, Dh = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.head_dim
    resid = 0.02 / (2 * L) ** 0.5  # the residual projections' std (a Python float: float32 values stay float32)

    def plan(name: str, shape: tuple[int, ...], std: float, *, ones: bool = False) -> TensorPlan:
        tname = q4_k_m_type(name, L, E, shape[-1]) if mix == "q4_k_m" else "F32"
        gtype = ggml.type_id(tname)

        def produce() -> np.ndarray:
            rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
            cols = shape[-1]
            if ones:
                return np.ones(shape, np.float32)
            row_b = ggml.row_bytes(gtype, cols)
            out = np.empty(rows * row_b, np.uint8)
            per = rows // shape[0] if len(shape) == 3 else rows  # experts: one matrix each
            chunks = shape[0] if len(shape) == 3 else 1

            def one(k: int) -> None:
                vals = w.matrix(per * cols, std)
                quantize(vals, per, cols, tname, out, k * per * row_b)

            list(pool.map(one, range(chunks)))
            return out

        return TensorPlan(name, shape, gtype, produce)

    ts = [plan("token_embd.weight", (s.vocab_size, D), 1.0)]
    for i in range(L):
        b = f"blk.{i}"
        ts += [plan(f"{b}.attn_norm.weight", (D,), 0, ones=True),
               plan(f"{b}.attn_q.weight", (q, D), 0.02), plan(f"{b}.attn_k.weight", (kv, D), 0.02),
               plan(f"{b}.attn_v.weight", (kv, D), 0.02), plan(f"{b}.attn_output.weight", (D, q), resid)]
        if s.qk_norm:
            ts += [plan(f"{b}.attn_q_norm.weight", (Dh,), 0, ones=True), plan(f"{b}.attn_k_norm.weight", (Dh,), 0, ones=True)]
        ts += [plan(f"{b}.ffn_norm.weight", (D,), 0, ones=True), plan(f"{b}.ffn_gate_inp.weight", (E, D), 0.5),
               plan(f"{b}.ffn_gate_exps.weight", (E, F, D), 0.02), plan(f"{b}.ffn_up_exps.weight", (E, F, D), 0.02),
               plan(f"{b}.ffn_down_exps.weight", (E, D, F), resid)]
    ts += [plan("output_norm.weight", (D,), 0, ones=True), plan("output.weight", (s.vocab_size, D), 0.02)]
    return ts


def write_model(out: Path, shape: str | dict, *, seed: int = 0, threads: int = 2, mix: str = "q4_k_m",
                say=print) -> Path:
    """Write the shape's GGUF (``mix`` q4_k_m, or f32 for every tensor) to ``out`` (atomically:
    aside, then renamed). ``shape``: a key of SHAPES or a dict of the same fields."""
    import gguf

    s = spec_of(SHAPES[shape] if isinstance(shape, str) else shape)
    name = NAMES.get(shape, "moe-shape") if isinstance(shape, str) else "moe-shape"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        el = time.time() - t0
        say(f"\r{out.name}: {done / 2**30:.2f} / {total / 2**30:.2f} GiB, {el:.0f} s, "
            f"ETA {el / max(done, 1) * (total - done):.0f} s", end="", flush=True)

    try:
        write_streaming(tmp, GGUF_ARCH[s.arch], lambda w: add_model_metadata(
            w, s, default_model_path() / "tokenizer.json", name=name,
            file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M if mix == "q4_k_m" else gguf.LlamaFileType.ALL_F32,
            bos_id=0, eos_id=0), plans(s, seed, threads, mix), progress)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"\nwrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mix", choices=("q4_k_m", "f32"), default="q4_k_m")
    args = ap.parse_args()
    write_model(args.out, args.shape, seed=args.seed, threads=args.threads, mix=args.mix)


if __name__ == "__main__":
    main()

