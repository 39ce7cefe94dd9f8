"""Hugging Face MoE checkpoints: config.json plus one or more safetensors files.

Supported: Mixtral, Qwen2-MoE and Qwen3-MoE, in the per-expert tensor layout that published
checkpoints use (and transformers 5's fused ``experts.gate_up_proj`` layout).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelFormatError, UnsupportedModelError, read_json_object
from edge.formats import safetensors_io as st
from edge.formats.weights import LayerWeights, ModelWeights
from edge.spec import ARCHITECTURES, ModelSpec

_EXPERT_RE = re.compile(r"\.experts\.(\d+\.|gate_up_proj|down_proj)")


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{model_dir} has no config.json (expected a Hugging Face checkpoint folder)")
    return read_json_object(cfg_path, ModelFormatError)


def tensor_index(model_dir: Path) -> dict[str, st.TensorInfo]:
    """Every tensor of the checkpoint, from single or sharded safetensors, headers validated."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{index} is malformed ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{model_dir} has no *.safetensors weights")
    infos: dict[str, st.TensorInfo] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise ModelFormatError(f"{model_dir}: shard {name} named in the index is missing")
        infos.update(st.read_header(path))
    return infos


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"RoPE scaling '{rope_type}' is not supported yet (only plain RoPE)")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def spec_from_config(cfg: dict[str, Any], infos: dict[str, st.TensorInfo]) -> ModelSpec:
    """The ModelSpec config.json and the tensors describe; impossible numbers (negative counts,
    strings where numbers belong, missing keys) are one-line ModelFormatErrors naming config.json."""
    try:
        return _spec_from_config(cfg, infos)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"describes an impossible model ({e})"
        raise ModelFormatError(f"config.json {what}") from None


def _spec_from_config(cfg: dict[str, Any], infos: dict[str, st.TensorInfo]) -> ModelSpec:
    arch = cfg.get("model_type")
    n_experts = _get(cfg, "num_local_experts", "num_experts", default=0)
    if arch not in ARCHITECTURES:
        if not n_experts:
            raise UnsupportedModelError(
                f"config.json describes a dense '{arch}' model (no experts); edge runs "
                f"Mixture-of-Experts models: {', '.join(ARCHITECTURES)}")
        raise UnsupportedModelError(
            f"architecture '{arch}' is not supported; supported: {', '.join(ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation '{cfg['hidden_act']}' is not supported (only silu)")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError("models that mix dense and MoE layers are not supported yet")
    if arch == "mixtral" and cfg.get("sliding_window"):
        raise UnsupportedModelError(f"sliding-window attention ({cfg['sliding_window']}) is not supported")
    d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    ffn = int(cfg["intermediate_size"] if arch == "mixtral" else cfg["moe_intermediate_size"])
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0
    sizes = {"dense": [0, 0], "expert": [0, 0]}
    for name, info in infos.items():
        kind = "expert" if _EXPERT_RE.search(name) else "dense"
        sizes[kind][0] += int(np.prod(info.shape, dtype=np.int64))
        sizes[kind][1] += info.nbytes
    expert_dtypes = {i.dtype for n, i in infos.items() if _EXPERT_RE.search(n)}
    return ModelSpec(
        arch=arch,
        n_layers=int(cfg["num_hidden_layers"]),
        hidden_size=d,
        n_heads=h,
        n_kv_heads=int(_get(cfg, "num_key_value_heads", default=h)),
        head_dim=int(_get(cfg, "head_dim", default=d // h)),
        n_experts=int(n_experts),
        top_k=int(cfg["num_experts_per_tok"]),
        expert_ffn_size=ffn,
        n_shared_experts=1 if shared else 0,
        shared_expert_ffn_size=shared,
        vocab_size=int(cfg["vocab_size"]),
        context_length=int(_get(cfg, "max_position_embeddings", default=2048)),
        rope_theta=_rope_theta(cfg),
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
        norm_topk_prob=True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        attn_bias=arch == "qwen2_moe" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "qwen3_moe",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dense_params=sizes["dense"][0],
        expert_params=sizes["expert"][0],
        dense_bytes=sizes["dense"][1],
        expert_bytes=sizes["expert"][1],
        weight_dtype="/".join(sorted(expert_dtypes)) or "none",
        source_format="hf",
    )


def read_spec(model_dir: Path) -> ModelSpec:
    cfg = read_config(model_dir)
    return spec_from_config(cfg, tensor_index(model_dir))


class CheckpointTensors:
    """A checkpoint's tensors by name, each read (as float32) only when asked for, its shape checked
    against what the config implies."""

    def __init__(self, model_dir: Path, infos: dict[str, st.TensorInfo]):
        self.dir, self.infos = model_dir, infos

    def has(self, name: str) -> bool:
        return name in self.infos

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        info = self.infos.get(name)
        if info is None:
            raise ModelFormatError(f"{self.dir}: checkpoint lacks tensor {name}")
        if tuple(info.shape) != tuple(shape):
            raise ModelFormatError(f"{self.dir}: tensor {name} has shape {list(info.shape)}, config implies {list(shape)}")
        return st.load(info)

    def opt(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return self(name, shape) if name in self.infos else None


def _experts(t: CheckpointTensors, s: ModelSpec, p: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    E, F, D = s.n_experts, s.expert_ffn_size, s.hidden_size
    if t.has(f"{p}.experts.gate_up_proj"):  # transformers 5 fused layout
        gate_up = t(f"{p}.experts.gate_up_proj", (E, 2 * F, D))
        return gate_up[:, :F], gate_up[:, F:], t(f"{p}.experts.down_proj", (E, D, F))
    names = ("w1", "w3", "w2") if s.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    shapes = ((F, D), (F, D), (D, F))
    out = []
    for name, shape in zip(names, shapes):
        stacked = np.empty((E, *shape), dtype=np.float32)
        for e in range(E):
            stacked[e] = t(f"{p}.experts.{e}.{name}.weight", shape)
        out.append(stacked)
    return out[0], out[1], out[2]


def load_weights(model_dir: Path) -> ModelWeights:
    """All weights as float32 numpy arrays in the engine's canonical layout."""
    cfg = read_config(model_dir)
    infos = tensor_index(model_dir)
    s = spec_from_config(cfg, infos)
    t = CheckpointTensors(model_dir, infos)
    D, V, Dh = s.hidden_size, s.vocab_size, s.head_dim
    q_dim, kv_dim = s.n_heads * Dh, s.n_kv_heads * Dh
    embed = t("model.embed_tokens.weight", (V, D))
    lm_head = embed if s.tied_embeddings or not t.has("lm_head.weight") else t("lm_head.weight", (V, D))
    layers = []
    for i in range(s.n_layers):
        a = f"model.layers.{i}.self_attn"
        moe = f"model.layers.{i}.block_sparse_moe"
        if s.arch != "mixtral" or not t.has(f"{moe}.gate.weight"):
            moe = f"model.layers.{i}.mlp"
        gate, up, down = _experts(t, s, moe)
        S = s.shared_expert_ffn_size
        layers.append(LayerWeights(
            attn_norm=t(f"model.layers.{i}.input_layernorm.weight", (D,)),
            wq=t(f"{a}.q_proj.weight", (q_dim, D)),
            wk=t(f"{a}.k_proj.weight", (kv_dim, D)),
            wv=t(f"{a}.v_proj.weight", (kv_dim, D)),
            wo=t(f"{a}.o_proj.weight", (D, q_dim)),
            bq=t(f"{a}.q_proj.bias", (q_dim,)) if s.attn_bias else None,
            bk=t(f"{a}.k_proj.bias", (kv_dim,)) if s.attn_bias else None,
            bv=t(f"{a}.v_proj.bias", (kv_dim,)) if s.attn_bias else None,
            q_norm=t(f"{a}.q_norm.weight", (Dh,)) if s.qk_norm else None,
            k_norm=t(f"{a}.k_norm.weight", (Dh,)) if s.qk_norm else None,
            ffn_norm=t(f"model.layers.{i}.post_attention_layernorm.weight", (D,)),
            router=t(f"{moe}.gate.weight", (s.n_experts, D)),
            gate=gate, up=up, down=down,
            shared_gate=t(f"{moe}.shared_expert.gate_proj.weight", (S, D)) if S else None,
            shared_up=t(f"{moe}.shared_expert.up_proj.weight", (S, D)) if S else None,
            shared_down=t(f"{moe}.shared_expert.down_proj.weight", (D, S)) if S else None,
            shared_router=t(f"{moe}.shared_expert_gate.weight", (1, D)) if S else None,
        ))
    return ModelWeights(spec=s, embed=embed, norm=t("model.norm.weight", (D,)), lm_head=lm_head, layers=layers)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def chat_template_parts(folder: Path) -> tuple[str | None, dict[str, str], str]:
    """(template source or None, special-token strings, where it came from) of a Hugging Face
    tokenizer folder: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates: the one named "default"); the special tokens
    (bos_token, eos_token, ...) from tokenizer_config.json."""
    config: dict = {}
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{cfg_file} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ModelFormatError(f"{cfg_file} must hold a JSON object")
    specials = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                               "mask_token") if (t := _token_text(config.get(k))) is not None}
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), specials, str(jinja_file)
    source = config.get("chat_template")
    if isinstance(source, list):
        source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}.get("default")
    if source is not None and not isinstance(source, str):
        raise ModelFormatError(f"{cfg_file}: chat_template must be a string or a list of named templates")
    return source, specials, str(cfg_file)
