"""The engine's canonical weights, whatever file they came from.

Matrices keep the PyTorch (out, in) layout and float32. Q and K rows are in the Hugging Face
"rotate-half" RoPE layout for every architecture; format writers permute where theirs differs.
Shapes: D hidden, H heads, G kv heads, Dh head dim, E experts, F expert FFN, S shared FFN, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.spec import ModelSpec


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [D]
    wq: np.ndarray  # [H*Dh, D]
    wk: np.ndarray  # [G*Dh, D]
    wv: np.ndarray  # [G*Dh, D]
    wo: np.ndarray  # [D, H*Dh]
    ffn_norm: np.ndarray  # [D]
    router: np.ndarray  # [E, D]
    gate: np.ndarray  # [E, F, D]
    up: np.ndarray  # [E, F, D]
    down: np.ndarray  # [E, D, F]
    bq: np.ndarray | None = None  # [H*Dh]
    bk: np.ndarray | None = None  # [G*Dh]
    bv: np.ndarray | None = None  # [G*Dh]
    q_norm: np.ndarray | None = None  # [Dh]
    k_norm: np.ndarray | None = None  # [Dh]
    shared_gate: np.ndarray | None = None  # [S, D]
    shared_up: np.ndarray | None = None  # [S, D]
    shared_down: np.ndarray | None = None  # [D, S]
    shared_router: np.ndarray | None = None  # [1, D]: sigmoid gate on the shared expert


@dataclass
class ModelWeights:
    spec: ModelSpec
    embed: np.ndarray  # [V, D]
    norm: np.ndarray  # [D]
    lm_head: np.ndarray  # [V, D]; the same array as embed when tied
    layers: list[LayerWeights]
