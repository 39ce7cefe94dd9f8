"""Routing traces: for every token and MoE layer, the top-K experts and their gate weights.

File format (``.npz``, numpy's zip of arrays; docs/traces.md):
    ids      int16   [T, L, K]  expert ids in router order (highest gate first)
    weights  float32 [T, L, K]  gate weights as the model applied them
    meta     JSON string: {"format": "edge-trace", "version": 1, "model", "n_experts", "top_k",
                           "n_layers", "source", "tokens"}
Shapes: T tokens, L layers, K active experts per token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

FORMAT, VERSION = "edge-trace", 1


@dataclass(frozen=True)
class RoutingTrace:
    ids: np.ndarray  # [T, L, K] int16
    weights: np.ndarray  # [T, L, K] float32
    n_experts: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ids.ndim != 3 or self.ids.shape != self.weights.shape:
            raise ValueError(f"ids {self.ids.shape} and weights {self.weights.shape} must both be [T, L, K]")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= self.n_experts):
            raise ValueError(f"expert ids outside 0..{self.n_experts - 1}")

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def n_layers(self) -> int:
        return self.ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.ids.shape[2]

    def layer(self, i: int) -> np.ndarray:
        """Expert ids of one layer, [T, K]."""
        return self.ids[:, i, :]

    def hotness(self) -> np.ndarray:
        """Share of each layer's activations that each expert receives, [L, E] (rows sum to 1)."""
        counts = np.zeros((self.n_layers, self.n_experts), dtype=np.int64)
        for i in range(self.n_layers):
            counts[i] = np.bincount(self.layer(i).ravel(), minlength=self.n_experts)
        return counts / max(1, self.n_tokens * self.top_k)

    def save(self, path: Path) -> None:
        meta = {"format": FORMAT, "version": VERSION, "n_experts": self.n_experts, "top_k": self.top_k,
                "n_layers": self.n_layers, "tokens": self.n_tokens} | {
            k: v for k, v in self.meta.items() if k not in ("format", "version")}
        tmp = Path(path).with_name(Path(path).name + ".tmp.npz")
        np.savez_compressed(tmp, ids=self.ids.astype(np.int16), weights=self.weights.astype(np.float32),
                            meta=np.array(json.dumps(meta)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "RoutingTrace":
        path = Path(path)
        if not path.is_file():
            raise EdgeError(f"{path}: no such trace file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                ids, weights = z["ids"], z["weights"]
        except (OSError, ValueError, KeyError) as e:
            raise EdgeError(f"{path} is not an edge routing trace ({e})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise EdgeError(f"{path}: trace format {meta.get('format')} v{meta.get('version')} is not {FORMAT} v{VERSION}")
        try:
            return cls(ids=ids, weights=weights, n_experts=int(meta["n_experts"]), meta=meta)
        except ValueError as e:
            raise EdgeError(f"{path}: {e}") from None


class TraceRecorder:
    """A route observer for the reference engine that accumulates a RoutingTrace.

    The engine calls it once per layer per forward pass with ids [T, K] and weights [T, K]."""

    def __init__(self, n_layers: int, n_experts: int):
        self.n_layers, self.n_experts = n_layers, n_experts
        self._ids: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self._w: list[list[np.ndarray]] = [[] for _ in range(n_layers)]

    def __call__(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        self._ids[layer].append(ids.astype(np.int16))
        self._w[layer].append(weights.astype(np.float32))

    def trace(self, **meta) -> RoutingTrace:
        ids = np.stack([np.concatenate(chunks) for chunks in self._ids], axis=1)
        w = np.stack([np.concatenate(chunks) for chunks in self._w], axis=1)
        return RoutingTrace(ids=ids, weights=w, n_experts=self.n_experts, meta=meta)


def record_trace(engine, tokens: Sequence[int], *, window: int = 512,
                 progress: Callable[[int, int], None] | None = None,
                 on_stream: Callable[[int, np.ndarray], None] | None = None, **meta) -> RoutingTrace:
    """Run ``tokens`` through an engine (reference or offload) in windows of ``window`` tokens
    (each from a fresh context, as perplexity is measured) and return every routing decision.
    ``on_stream``: also called with each layer's residual stream (the engine's stream observers)."""
    spec = engine.spec
    rec = TraceRecorder(spec.n_layers, spec.n_experts)
    engine.route_observers.append(rec)
    if on_stream is not None:
        engine.stream_observers.append(on_stream)
    try:
        for start in range(0, len(tokens), window):
            engine.truncate(0)
            engine.eval(list(tokens[start : start + window]))
            if progress:
                progress(min(len(tokens), start + window), len(tokens))
    finally:
        engine.route_observers.remove(rec)
        if on_stream is not None:
            engine.stream_observers.remove(on_stream)
    return rec.trace(**meta)
