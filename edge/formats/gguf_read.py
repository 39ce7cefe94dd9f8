"""Read GGUF files: a ModelSpec from the metadata, and float32 weights by dequantizing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelFormatError, UnsupportedModelError
from edge.formats.gguf_write import GGUF_ARCH, unpermute_qk
from edge.formats.weights import LayerWeights, ModelWeights
from edge.spec import ModelSpec

_ARCH_FROM_GGUF = {v: k for k, v in GGUF_ARCH.items()}
_MAGIC = b"GGUF"


def open_reader(path: Path):
    """A gguf.GGUFReader, with non-GGUF and truncated files turned into one-line errors."""
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ModelFormatError(f"{path.name} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/IndexError on damaged files
        raise ModelFormatError(f"{path.name} is a damaged GGUF file ({size:,} bytes): {e}") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelFormatError(f"{path.name} is truncated: tensors need {end:,} bytes, the file has {size:,}")
    return reader


def _fields(reader) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        try:
            out[name] = field.contents()
        except Exception:  # metadata we do not understand is not needed
            continue
    return out


def _f32(v: Any) -> float:
    """GGUF stores floats as float32: print the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _is_expert(name: str) -> bool:
    return "_exps." in name


def read_spec(path: Path, reader=None) -> ModelSpec:
    reader = reader or open_reader(path)
    kv = _fields(reader)
    garch = kv.get("general.architecture")
    n_experts = int(kv.get(f"{garch}.expert_count", 0) or 0)
    if garch not in _ARCH_FROM_GGUF or not n_experts:
        if not n_experts:
            raise UnsupportedModelError(
                f"{path.name} is a dense '{garch}' model (no experts); edge runs Mixture-of-Experts models")
        raise UnsupportedModelError(f"{path.name}: GGUF architecture '{garch}' is not supported")
    arch = _ARCH_FROM_GGUF[garch]
    tensors = {t.name: t for t in reader.tensors}

    def key(k: str, default: Any = None) -> Any:
        v = kv.get(f"{garch}.{k}", default)
        if v is None:
            raise ModelFormatError(f"{path.name} lacks metadata key {garch}.{k}")
        return v

    d, h = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(kv.get(f"{garch}.attention.key_length") or kv.get(f"{garch}.rope.dimension_count") or d // h)
    ffn = int(key("feed_forward_length") if arch == "mixtral" else key("expert_feed_forward_length"))
    shared = int(kv.get(f"{garch}.expert_shared_feed_forward_length") or 0) if "blk.0.ffn_gate_shexp.weight" in tensors else 0
    sizes = {True: [0, 0], False: [0, 0]}
    for t in reader.tensors:
        sizes[_is_expert(t.name)][0] += int(t.n_elements)
        sizes[_is_expert(t.name)][1] += int(t.n_bytes)
    expert_types = sorted({t.tensor_type.name for t in reader.tensors if _is_expert(t.name)})
    vocab = tensors["token_embd.weight"].shape[-1] if "token_embd.weight" in tensors else key("vocab_size")
    return ModelSpec(
        arch=arch,
        n_layers=int(key("block_count")),
        hidden_size=d,
        n_heads=h,
        n_kv_heads=int(kv.get(f"{garch}.attention.head_count_kv") or h),
        head_dim=head_dim,
        n_experts=n_experts,
        top_k=int(key("expert_used_count")),
        expert_ffn_size=ffn,
        n_shared_experts=1 if shared else 0,
        shared_expert_ffn_size=shared,
        vocab_size=int(vocab),
        context_length=int(key("context_length")),
        rope_theta=_f32(kv.get(f"{garch}.rope.freq_base") or 10000.0),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        norm_topk_prob=arch != "qwen2_moe",
        attn_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tied_embeddings="output.weight" not in tensors,
        dense_params=sizes[False][0],
        expert_params=sizes[True][0],
        dense_bytes=sizes[False][1],
        expert_bytes=sizes[True][1],
        weight_dtype="/".join(expert_types),
        source_format="gguf",
    )


def load_weights(path: Path) -> ModelWeights:
    """All weights dequantized to float32, in the engine's canonical layout."""
    from gguf.quants import dequantize

    reader = open_reader(path)
    s = read_spec(path, reader)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path.name} lacks tensor {name}")
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            tuple(int(x) for x in reversed(t.shape)))

    def opt(name: str) -> np.ndarray | None:
        return get(name) if name in tensors else None

    embed = get("token_embd.weight")
    layers = []
    for i in range(s.n_layers):
        b = f"blk.{i}"
        wq, wk = get(f"{b}.attn_q.weight"), get(f"{b}.attn_k.weight")
        if s.arch == "mixtral":
            wq, wk = unpermute_qk(wq, s.n_heads), unpermute_qk(wk, s.n_kv_heads)
        sr = opt(f"{b}.ffn_gate_inp_shexp.weight")
        layers.append(LayerWeights(
            attn_norm=get(f"{b}.attn_norm.weight"), wq=wq, wk=wk, wv=get(f"{b}.attn_v.weight"),
            wo=get(f"{b}.attn_output.weight"), ffn_norm=get(f"{b}.ffn_norm.weight"),
            router=get(f"{b}.ffn_gate_inp.weight"), gate=get(f"{b}.ffn_gate_exps.weight"),
            up=get(f"{b}.ffn_up_exps.weight"), down=get(f"{b}.ffn_down_exps.weight"),
            bq=opt(f"{b}.attn_q.bias"), bk=opt(f"{b}.attn_k.bias"), bv=opt(f"{b}.attn_v.bias"),
            q_norm=opt(f"{b}.attn_q_norm.weight"), k_norm=opt(f"{b}.attn_k_norm.weight"),
            shared_gate=opt(f"{b}.ffn_gate_shexp.weight"), shared_up=opt(f"{b}.ffn_up_shexp.weight"),
            shared_down=opt(f"{b}.ffn_down_shexp.weight"),
            shared_router=None if sr is None else sr.reshape(1, -1),
        ))
    lm_head = embed if s.tied_embeddings else get("output.weight")
    return ModelWeights(spec=s, embed=embed, norm=get("output_norm.weight"), lm_head=lm_head, layers=layers)
