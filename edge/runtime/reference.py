"""The reference engine: a torch-free numpy decoder for Mixtral, Qwen2-MoE and Qwen3-MoE.

It is the correctness baseline the other backends are checked against (its logits match
transformers within 1e-3 in fp32, tests/test_reference_engine.py) and it exposes every routing
decision, which the expert-offload work records as traces.

Shapes: T new tokens, S positions in the cache, D hidden, H heads, G kv heads, Dh head dim,
E experts, K active experts, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edge.runtime.generate import checked_tokens
from edge.formats.weights import LayerWeights, ModelWeights

# Called once per layer per forward: (layer index, expert ids [T, K], gate weights [T, K]).
RouteObserver = Callable[[int, np.ndarray, np.ndarray], None]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """RoPE frequencies as transformers computes them, in float32 (rotate-half layout)."""
    half = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    return (1.0 / (np.float32(theta) ** half)).astype(np.float32)


def rope_tables(inv_freq: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, 1, Dh] for positions pos [T]."""
    freqs = pos.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, Dh] rotated in the rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention. q [T, H, Dh] at positions start.., keys/values [G, S, Dh]
    (S = start + T) -> [T, H * Dh]."""
    T, H, Dh = q.shape
    G, S = keys.shape[0], keys.shape[1]
    qg = q.transpose(1, 0, 2).reshape(G, H // G, T, Dh)
    scores = qg @ keys[:, None].transpose(0, 1, 3, 2) / np.float32(np.sqrt(Dh))  # [G, H/G, T, S]
    if T > 1:
        causal = np.arange(S)[None, :] > (start + np.arange(T))[:, None]  # [T, S]
        scores = np.where(causal, np.float32(-np.inf), scores)
    out = softmax(scores) @ values[:, None]  # [G, H/G, T, Dh]
    return out.reshape(H, T, Dh).transpose(1, 0, 2).reshape(T, H * Dh)


def attend_cached(spec, lw, q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache: np.ndarray,
                  v_cache: np.ndarray, start: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """One layer's attention from its projections q, k, v [T, heads x head_dim] (biases, per-head
    norms and RoPE applied here; ``lw`` has bq/bk/bv, q_norm/k_norm): the new keys and values are
    written into the layer's caches [G, S, Dh] at positions start.., and the heads attend over
    everything up to them -> [T, H * Dh], before the output projection. Shared by every engine."""
    T, H, G, Dh = q.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
    if lw.bq is not None:
        q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
    q, k, v = q.reshape(T, H, Dh), k.reshape(T, G, Dh), v.reshape(T, G, Dh)
    if lw.q_norm is not None:
        q, k = rms_norm(q, lw.q_norm, spec.rms_norm_eps), rms_norm(k, lw.k_norm, spec.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    end = start + T
    k_cache[:, start:end] = k.transpose(1, 0, 2)
    v_cache[:, start:end] = v.transpose(1, 0, 2)
    return attend(q, k_cache[:, :end], v_cache[:, :end], start)


def route(x: np.ndarray, router: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the router logits, keep the top k. x [T, D] -> ids [T, K], weights [T, K]."""
    probs = softmax(x @ router.T)  # [T, E]
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, ids, axis=-1)
    if normalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, w.astype(np.float32)


class ReferenceEngine:
    """Runs a model held in memory as float32 numpy arrays, with a KV cache.

    >>> from edge.formats.hf import load_weights
    >>> from edge.models import default_model_path
    >>> eng = ReferenceEngine(load_weights(default_model_path()))
    >>> eng.eval([10, 20, 30]).shape
    (4096,)
    """

    name = "reference"

    def __init__(self, weights: ModelWeights, *, n_ctx: int = 2048):
        s = weights.spec
        self.w, self.spec = weights, s
        self.n_ctx = min(n_ctx, s.context_length)
        self.n_vocab = s.vocab_size
        shape = (s.n_layers, s.n_kv_heads, self.n_ctx, s.head_dim)
        self._k = np.zeros(shape, dtype=np.float32)
        self._v = np.zeros(shape, dtype=np.float32)
        self.n_past = 0
        self._inv_freq = rope_inv_freq(s.head_dim, s.rope_theta)
        self.route_observers: list[RouteObserver] = []
        # Called with (-1, embeddings) and (i, residual stream after layer i's attention): what the
        # offload engine's prefetcher guesses the next layer's experts from.
        self.stream_observers: list[Callable[[int, np.ndarray], None]] = []
        # Called with (layer, name, x) for the input x [T, in] of a dense matrix ("wq" stands for
        # q, k and v, which share it; "wo"): BitStack's activation scales come from these.
        self.input_observers: list[Callable[[int, str, np.ndarray], None]] = []

    # -- Backend protocol -------------------------------------------------------------------
    def eval(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the context; return logits [V] after the last (or [T, V])."""
        ids = checked_tokens(tokens, self.n_past, self.n_ctx, self.n_vocab)
        x = self.w.embed[ids]  # [T, D]
        pos = np.arange(self.n_past, self.n_past + len(ids))
        cos, sin = rope_tables(self._inv_freq, pos)
        for observe in self.stream_observers:
            observe(-1, x)
        for i, layer in enumerate(self.w.layers):
            x = x + self._attention(i, layer, rms_norm(x, layer.attn_norm, self.spec.rms_norm_eps), cos, sin)
            for observe in self.stream_observers:
                observe(i, x)
            x = x + self._moe(i, layer, rms_norm(x, layer.ffn_norm, self.spec.rms_norm_eps))
        self.n_past += len(ids)
        h = rms_norm(x if all_logits else x[-1:], self.w.norm, self.spec.rms_norm_eps)
        logits = h @ self.w.lm_head.T
        return logits if all_logits else logits[0]

    def truncate(self, n: int) -> None:
        """Forget every position from n on (the cache rows are simply overwritten later)."""
        self.n_past = max(0, min(n, self.n_past))

    def close(self) -> None:
        self._k = self._v = np.zeros((0,), dtype=np.float32)

    # -- layers -----------------------------------------------------------------------------
    def _attention(self, i: int, lw: LayerWeights, x: np.ndarray, cos, sin) -> np.ndarray:
        for observe in self.input_observers:
            observe(i, "wq", x)
        att = attend_cached(self.spec, lw, x @ lw.wq.T, x @ lw.wk.T, x @ lw.wv.T, self._k[i], self._v[i], self.n_past,
                            cos, sin)
        for observe in self.input_observers:
            observe(i, "wo", att)
        return att @ lw.wo.T

    def _moe(self, i: int, lw: LayerWeights, x: np.ndarray) -> np.ndarray:
        ids, weights = route(x, lw.router, self.spec.top_k, self.spec.norm_topk_prob)
        for observe in self.route_observers:
            observe(i, ids, weights)
        out = np.zeros_like(x)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            h = x[rows]
            y = (silu(h @ lw.gate[e].T) * (h @ lw.up[e].T)) @ lw.down[e].T
            out[rows] += y * weights[rows, slot][:, None]
        if lw.shared_gate is not None:
            y = (silu(x @ lw.shared_gate.T) * (x @ lw.shared_up.T)) @ lw.shared_down.T
            out += y / (1.0 + np.exp(-(x @ lw.shared_router.T)))
        return out
