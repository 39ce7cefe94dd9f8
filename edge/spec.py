"""ModelSpec: what a model is, independent of the file it came from.

Dimensions are named once: L layers, D hidden, H query heads, G kv heads, Dh head dim,
E routed experts, K active experts per token, F expert FFN width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # one of ARCHITECTURES
    n_layers: int  # L
    hidden_size: int  # D
    n_heads: int  # H
    n_kv_heads: int  # G
    head_dim: int  # Dh
    n_experts: int  # E
    top_k: int  # K
    expert_ffn_size: int  # F
    n_shared_experts: int  # always-active experts (Qwen2-MoE: 1); counted as dense weights
    shared_expert_ffn_size: int
    vocab_size: int  # V
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    norm_topk_prob: bool  # renormalise the top-K gate weights to sum to 1
    attn_bias: bool  # q/k/v projections carry biases (Qwen2-MoE)
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (Qwen3-MoE)
    tied_embeddings: bool
    # Sizes: "expert" = routed-expert FFN weights; "dense" = everything else (the trunk).
    dense_params: int
    expert_params: int
    dense_bytes: int
    expert_bytes: int
    weight_dtype: str  # storage type of the expert weights: F32, F16, BF16, Q8_0, Q4_0, ...
    source_format: str  # "hf" or "gguf"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}")
        for name in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "n_experts", "top_k",
                     "expert_ffn_size", "vocab_size", "context_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..{self.n_experts}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} heads do not divide into {self.n_kv_heads} kv heads")

    @property
    def total_params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters touched per token: the trunk plus K of E experts in every layer."""
        return self.dense_params + self.expert_params * self.top_k // self.n_experts

    @property
    def dense_streamed_params(self) -> int:
        """Trunk parameters a decode step reads whole: all but the embedding table, of which a
        token reads one row (when tied, the same table is read whole as the output matrix)."""
        return self.dense_params - (0 if self.tied_embeddings else self.vocab_size * self.hidden_size)

    def decode_bytes(self, dense_bpw: float, expert_bpw: float) -> float:
        """Bytes of weights one decoded token streams: the trunk and K of E experts per layer."""
        return (self.dense_streamed_params * dense_bpw + self.expert_params * self.top_k / self.n_experts * expert_bpw) / 8

    @property
    def expert_bytes_each(self) -> int:
        """Bytes of one expert (gate, up and down matrices) in one layer, as stored."""
        return self.expert_bytes // (self.n_layers * self.n_experts)

    def architecture(self) -> dict[str, Any]:
        """The numbers that define the network, without storage details: equal for a checkpoint
        and any faithful conversion of it."""
        skip = {"dense_bytes", "expert_bytes", "weight_dtype", "source_format"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ValueError(f"model spec lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names})


@dataclass(frozen=True)
class StoredExperts:
    """How a model is stored where the offload engine reads it (a GGUF's own tensors), for the
    planner: per layer, the bytes one expert's cache slot holds and its reads move (aligned spans of
    its matrices, one read each), the type and bytes of each of its matrices, and the trunk: what
    stays resident and what a decoded token streams of it, by type."""

    slot_bytes: tuple[int, ...]  # per layer
    read_bytes: tuple[int, ...]  # per layer: one expert's reads, on average
    reads_per_load: int
    expert_types: tuple[tuple[tuple[str, int], ...], ...]  # per layer: (ggml type, bytes) of each matrix
    trunk_bytes: int
    trunk_streamed: tuple[tuple[str, int], ...]  # (ggml type, bytes) a decoded token reads of the trunk

    @property
    def types(self) -> str:
        """'Q4_K/Q6_K': the types the experts are stored in."""
        return "/".join(sorted({t for layer in self.expert_types for t, _ in layer}))
