"""Write GGUF files that llama.cpp runs, from the engine's canonical weights.

f32 and f16 are written here with the ``gguf`` package; the integer types (q8_0, q4_0, the
K-quants) are produced from an f32 file by llama.cpp's own quantizer (``llama_model_quantize``),
so the quantized file is exactly what llama.cpp users make with ``llama-quantize``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge.errors import EdgeError, UnsupportedModelError
from edge.formats.gguf_stream import GGUF_ARCH, add_model_metadata
from edge.formats.weights import ModelWeights
from edge.spec import ModelSpec

__all__ = ["GGUF_ARCH", "OUTTYPES", "QUANT_TYPES", "permute_qk", "quantize_gguf", "unpermute_qk", "write_gguf"]

# llama.cpp's graph for each arch either renormalises the top-k gate weights or does not.
_LLAMA_CPP_NORMALIZES = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}

# Output types: the name users pass -> llama_cpp LLAMA_FTYPE_* constant for the quantizer.
QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
OUTTYPES = ("f32", "f16", *QUANT_TYPES)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half (Hugging Face) row order -> llama.cpp's interleaved RoPE pairs ("llama" arch)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk: llama.cpp interleaved pairs -> rotate-half row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(weights: ModelWeights, tokenizer_json: Path, out: Path, *, outtype: str = "f32",
               bos_id: int | None = None, eos_id: int | None = None, name: str = "edge-model",
               threads: int = 2) -> None:
    """Write ``out`` as a GGUF of ``outtype`` (f32, f16, q8_0, q4_0, q4_k_m, ...)."""
    if outtype not in OUTTYPES:
        raise EdgeError(f"unknown GGUF type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    s = weights.spec
    if s.norm_topk_prob != _LLAMA_CPP_NORMALIZES[s.arch]:
        raise UnsupportedModelError(
            f"{s.arch} with norm_topk_prob={s.norm_topk_prob} differs from llama.cpp's graph for it")
    if outtype in ("f32", "f16"):
        _write_float(weights, tokenizer_json, out, outtype, bos_id, eos_id, name)
        return
    tmp = out.with_name(out.name + ".f32.tmp")
    try:
        _write_float(weights, tokenizer_json, tmp, "f32", bos_id, eos_id, name)
        quantize_gguf(tmp, out, outtype, threads=threads)
    finally:
        tmp.unlink(missing_ok=True)


def quantize_gguf(src: Path, dst: Path, outtype: str, *, threads: int = 2) -> None:
    """Quantize a GGUF with llama.cpp's quantizer (the router and norms stay unquantized)."""
    import llama_cpp

    from edge._llamacpp import route_llama_logs

    route_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[outtype])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), params)
    if rc != 0:
        raise EdgeError(f"llama.cpp failed to quantize {src.name} to {outtype} (code {rc})")


def _write_float(weights: ModelWeights, tokenizer_json: Path, out: Path, outtype: str,
                 bos_id: int | None, eos_id: int | None, name: str) -> None:
    import gguf

    s: ModelSpec = weights.spec
    arch = GGUF_ARCH[s.arch]
    fdt = np.float16 if outtype == "f16" else np.float32
    w = gguf.GGUFWriter(str(out), arch)
    add_model_metadata(w, s, tokenizer_json, name=name, bos_id=bos_id, eos_id=eos_id,
                       file_type=gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)

    def put(tname: str, arr: np.ndarray, keep_f32: bool = False) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32 if keep_f32 or arr.ndim == 1 else fdt)
        w.add_tensor(tname, arr)

    put("token_embd.weight", weights.embed)
    put("output_norm.weight", weights.norm)
    if not s.tied_embeddings:
        put("output.weight", weights.lm_head)
    for i, lw in enumerate(weights.layers):
        b = f"blk.{i}"
        wq, wk = lw.wq, lw.wk
        if arch == "llama":
            wq, wk = permute_qk(wq, s.n_heads), permute_qk(wk, s.n_kv_heads)
        put(f"{b}.attn_norm.weight", lw.attn_norm)
        put(f"{b}.attn_q.weight", wq)
        put(f"{b}.attn_k.weight", wk)
        put(f"{b}.attn_v.weight", lw.wv)
        put(f"{b}.attn_output.weight", lw.wo)
        if lw.bq is not None:
            put(f"{b}.attn_q.bias", lw.bq)
            put(f"{b}.attn_k.bias", lw.bk)
            put(f"{b}.attn_v.bias", lw.bv)
        if lw.q_norm is not None:
            put(f"{b}.attn_q_norm.weight", lw.q_norm)
            put(f"{b}.attn_k_norm.weight", lw.k_norm)
        put(f"{b}.ffn_norm.weight", lw.ffn_norm)
        put(f"{b}.ffn_gate_inp.weight", lw.router, keep_f32=True)  # routing stays exact
        put(f"{b}.ffn_gate_exps.weight", lw.gate)
        put(f"{b}.ffn_up_exps.weight", lw.up)
        put(f"{b}.ffn_down_exps.weight", lw.down)
        if lw.shared_gate is not None:
            put(f"{b}.ffn_gate_inp_shexp.weight", lw.shared_router.reshape(-1), keep_f32=True)
            put(f"{b}.ffn_gate_shexp.weight", lw.shared_gate)
            put(f"{b}.ffn_up_shexp.weight", lw.shared_up)
            put(f"{b}.ffn_down_shexp.weight", lw.shared_down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
