"""The offload engine: the trunk resident, experts read from their source (an offload bundle's
nested store, or a GGUF file as it is) into a per-layer cache, prefetched one layer ahead, served
at the bits HEBF assigns (nested stores).

Matrices run on ggml's kernels (edge/runtime/ggml.py; docs/kernels.md says why); norms, RoPE,
attention scores and routing stay in numpy.
Shapes: T tokens, D hidden, H heads, G kv heads, Dh head dim, E experts, K active.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from edge import _native as native
from edge.errors import EdgeError
from edge.hardware import default_threads
from edge.moe.policies import DEFAULT_POLICY, Policy, ResidentSet
from edge.moe.sizing import BATCH, LOGIT_ROWS, scratch_bytes
from edge.quant.stack import LoadedStack
from edge.runtime import ggml
from edge.runtime.offload.experts import ExpertSource, Slot
from edge.runtime.offload.prefetch import prefetch_guess
from edge.runtime.offload.trunk import LayerTrunk, Trunk
from edge.runtime.reference import attend_cached, rms_norm, rope_inv_freq, rope_tables, route

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # hits on experts that the prefetcher brought in
    prefetched: int = 0


@dataclass
class Telemetry:
    """Counters the engine updates; ``snapshot()`` turns them into a plain dict for UIs."""

    layers: list[LayerStats]
    bytes_read: int = 0
    io_seconds: float = 0.0
    stall_seconds: float = 0.0
    bits_served: dict[int, int] = field(default_factory=dict)
    tokens: int = 0
    decode_seconds: float = 0.0
    first_token_seconds: float | None = None
    resizes: list[dict] = field(default_factory=list)  # memory-budget changes, newest last


class LayerCache:
    """C expert slots of one layer (buffers and ggml tensors from the expert source); which expert
    sits where, and which leaves on a miss, is the :class:`ResidentSet` the simulators run."""

    def __init__(self, capacity: int, source: ExpertSource, layer: int, policy: Policy):
        self.capacity, self.policy = capacity, policy
        self.resident = ResidentSet(capacity, policy)
        self.slot_bytes = source.slot_bytes(layer)
        self.slots: list[Slot] = source.new_slots(layer, capacity) if capacity else []
        self.bits_of: dict[int, int] = {}
        self.from_prefetch: set[int] = set()

    @property
    def slot_of(self) -> dict[int, int]:
        """expert -> slot of the experts resident now."""
        return self.resident.slot_of

    def admit(self, expert: int, spare: set[int]) -> int:
        """A slot for ``expert`` (evicting the policy's victim outside ``spare`` when full)."""
        slot, victim = self.resident.admit(expert, spare)
        if victim is not None:
            self.bits_of.pop(victim, None)
            self.from_prefetch.discard(victim)
        return slot


@dataclass(frozen=True)
class OffloadConfig:
    slots: tuple[int, ...]  # cache capacity per layer
    bits: np.ndarray  # [L, E] bits each expert is loaded at
    policy: str = DEFAULT_POLICY
    prefetch: bool = True
    threads: int = 0  # 0: the physical cores (edge.hardware.default_threads)
    io_mode: str = "auto"


class OffloadEngine:
    """Backend protocol implementation (eval / truncate / close) over an expert store."""

    name = "offload"

    def __init__(self, trunk: Trunk, experts: ExpertSource, config: OffloadConfig, *, n_ctx: int = 2048,
                 stack: LoadedStack | None = None, batch: int = 0):
        s = trunk.spec
        self.spec, self.trunk, self.experts, self.config = s, trunk, experts, config
        self.threads = config.threads or default_threads()
        self.n_ctx = min(n_ctx, s.context_length)
        self.batch = batch or BATCH  # prompt tokens per forward pass: the graph scratch grows with it
        self.n_vocab = s.vocab_size
        self.n_past = 0
        self.route_observers: list = []
        # (layer, residual [T, D]) where the prefetcher guesses that layer's experts: calibration
        # replays the prefetcher's guesses from these (edge/builder/calibrate.py)
        self.stream_observers: list = []
        self._inv_freq = rope_inv_freq(s.head_dim, s.rope_theta)
        self.layers: list[LayerTrunk] = trunk.layers
        # Stacked bundles: attention matrices are indices into the BitStack stack, reconstructed
        # from the loaded blocks on every use, so only the blocks stay in memory.
        self.stack = stack
        largest = max((m[2] * m[3] for m in stack.index.matrices), default=0) if stack else 0
        self._stack_scratch = np.empty(largest, np.float32)
        shape = (s.n_layers, s.n_kv_heads, self.n_ctx, s.head_dim)
        self._k = np.empty(shape, dtype=np.float32)
        self._v = np.empty(shape, dtype=np.float32)
        self.telemetry = Telemetry(layers=[LayerStats() for _ in range(s.n_layers)])
        self._graph_mem = np.empty(scratch_bytes(s, self.batch), dtype=np.uint8)
        for buf in (self._k, self._v, self._graph_mem, self._stack_scratch, *experts.staging_buffers()):
            buf.fill(0)  # fault the pages in now, so the memory measured after init is all of it
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-prefetch") if config.prefetch else None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.eval_lock = threading.Lock()  # a resize waits for the token in flight: the next one sees it
        self.budget_bytes: int | None = None
        self.fixed_bytes = 0
        self.caches: list[LayerCache] = []
        self.set_cache(config.slots, config.bits)

    def set_cache(self, slots: Sequence[int], bits: np.ndarray) -> None:
        """(Re)build the expert caches: ``slots`` per layer, experts loaded at ``bits`` [L, E]."""
        for fut in list(self._pending.values()):
            fut.result()
        self._pending.clear()
        if len(slots) != self.spec.n_layers or np.asarray(bits).shape != (self.spec.n_layers, self.spec.n_experts):
            raise ValueError("slots and bits must cover every layer (and expert)")
        self.config = replace(self.config, slots=tuple(int(c) for c in slots), bits=np.asarray(bits))
        self.caches = []  # free the old slots before allocating the new ones
        self.caches = [LayerCache(c, self.experts, i, Policy(self.config.policy, self.spec.n_experts))
                       for i, c in enumerate(slots)]

    # -- memory ---------------------------------------------------------------------------
    @property
    def cache_bytes(self) -> int:
        return sum(c.slot_bytes * c.capacity for c in self.caches)

    # -- expert loading ---------------------------------------------------------------------
    def _load(self, layer: int, expert: int, protect: set[int], who: str) -> None:
        cache = self.caches[layer]
        bits = int(self.config.bits[layer, expert])
        slot = cache.admit(expert, protect)
        t0 = time.perf_counter()
        try:
            nbytes = self.experts.load(layer, expert, bits, cache.slots[slot], who)
        except BaseException:
            cache.resident.release(expert)  # a failed load leaves no expert behind
            raise
        cache.bits_of[expert] = bits
        with self._lock:
            self.telemetry.bytes_read += nbytes
            self.telemetry.io_seconds += time.perf_counter() - t0

    def _prefetch(self, layer: int, experts: list[int]) -> None:
        cache = self.caches[layer]
        want = set(experts[: cache.capacity])
        for e in experts[: cache.capacity]:
            if e not in cache.slot_of:
                self._load(layer, e, want, "io")
                cache.from_prefetch.add(e)
                self.telemetry.layers[layer].prefetched += 1

    def _schedule_prefetch(self, layer: int, h: np.ndarray) -> None:
        """Guess layer ``layer``'s experts from its router applied to the current hidden state."""
        if self._pool is None or layer >= self.spec.n_layers or layer in self._pending or h.shape[0] != 1:
            return  # decode only: a prompt's many tokens need most experts anyway
        lw = self.layers[layer]
        guess = prefetch_guess(h, lw.ffn_norm, lw.router, self.spec.rms_norm_eps, self.spec.top_k)
        if all(e in self.caches[layer].slot_of for e in guess):
            return  # nothing to load: skip the thread hand-off (it costs more than the check)
        self._pending[layer] = self._pool.submit(self._prefetch, layer, guess)

    def _wait(self, layer: int) -> None:
        fut = self._pending.pop(layer, None)
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()
            self.telemetry.stall_seconds += time.perf_counter() - t0

    # -- forward ------------------------------------------------------------------------------
    def eval(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        with self.eval_lock:
            return self._eval(tokens, all_logits)

    def _eval(self, tokens: Sequence[int], all_logits: bool) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if len(ids) == 0:
            raise ValueError("eval needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise EdgeError(f"context full: {self.n_past} + {len(ids)} tokens exceed n_ctx {self.n_ctx}")
        t_start = time.perf_counter()
        rows = []
        for start in range(0, len(ids), self.batch):  # long prompts in batches: bounded scratch memory
            x = self._forward(ids[start : start + self.batch])
            if all_logits or start + self.batch >= len(ids):
                rows.append(self._logits(x if all_logits else x[-1:]))
        logits = np.concatenate(rows)
        dt = time.perf_counter() - t_start
        tel = self.telemetry
        if tel.first_token_seconds is None:
            tel.first_token_seconds = dt
        if len(ids) == 1:
            tel.tokens += 1
            tel.decode_seconds += dt
        return logits if all_logits else logits[0]

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """Tokens ids [T] through every layer at positions n_past.. -> the final residual [T, D]."""
        s = self.spec
        g = ggml.Graph(buffer=self._graph_mem)
        x = g.compute([g.get_rows(self.trunk.embed, ids)], self.threads)[0]  # [T, D]
        cos, sin = rope_tables(self._inv_freq, np.arange(self.n_past, self.n_past + len(ids)))
        self._guess_point(0, x)
        for i, lw in enumerate(self.layers):
            x = x + self._attention(i, lw, rms_norm(x, lw.attn_norm, s.rms_norm_eps), cos, sin)
            self._guess_point(i + 1, x)
            x = x + self._moe(i, lw, rms_norm(x, lw.ffn_norm, s.rms_norm_eps))
        self.n_past += len(ids)
        return x

    def _guess_point(self, layer: int, x: np.ndarray) -> None:
        for observe in self.stream_observers:
            observe(layer, x)
        self._schedule_prefetch(layer, x)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """x [T, D] -> logits [T, V], LOGIT_ROWS rows per graph."""
        h = rms_norm(x, self.trunk.norm, self.spec.rms_norm_eps)
        out = []
        for start in range(0, len(h), LOGIT_ROWS):
            g = ggml.Graph(buffer=self._graph_mem)
            out.append(g.compute([g.matmul(self.trunk.lm_head, g.input(h[start : start + LOGIT_ROWS]))], self.threads)[0])
        return np.concatenate(out)

    def _attention(self, i: int, lw: LayerTrunk, x: np.ndarray, cos, sin) -> np.ndarray:
        if isinstance(lw.wq, int):  # a stack index: rebuilt from its blocks
            q, k, v = (self._stacked(getattr(lw, name), x) for name in ("wq", "wk", "wv"))
        else:
            g = ggml.Graph(buffer=self._graph_mem)
            xi = g.input(x)
            q, k, v = g.compute([g.matmul(lw.wq, xi), g.matmul(lw.wk, xi), g.matmul(lw.wv, xi)], self.threads)
        att = attend_cached(self.spec, lw, q, k, v, self._k[i], self._v[i], self.n_past, cos, sin)
        if isinstance(lw.wo, int):
            return self._stacked(lw.wo, att)
        g = ggml.Graph(buffer=self._graph_mem)
        return g.compute([g.matmul(lw.wo, g.input(att))], self.threads)[0]

    def _stacked(self, j: int, x: np.ndarray) -> np.ndarray:
        """x @ W.T for stack matrix ``j``, W rebuilt from its loaded blocks into one scratch buffer."""
        _, _, m, n = self.stack.index.matrices[j]
        w = self.stack.reconstruct(j, self._stack_scratch[: m * n].reshape(m, n))
        return x @ w.T

    def _moe(self, i: int, lw: LayerTrunk, x: np.ndarray) -> np.ndarray:
        s = self.spec
        ids, weights = route(x, lw.router, s.top_k, s.norm_topk_prob)
        for observe in self.route_observers:
            observe(i, ids, weights)
        cache, stats = self.caches[i], self.telemetry.layers[i]
        for t in range(ids.shape[0]):
            cache.policy.on_token(tuple(int(e) for e in ids[t]))
        self._wait(i)
        needed = [int(e) for e in dict.fromkeys(ids.ravel().tolist())]
        out = np.zeros_like(x)
        for start in range(0, len(needed), cache.capacity):  # prefill may need more than fit
            group = needed[start : start + cache.capacity]
            protect = set(group)
            for e in group:
                if e in cache.slot_of:
                    stats.hits += 1
                    if e in cache.from_prefetch:
                        stats.prefetch_hits += 1
                        cache.from_prefetch.discard(e)
                else:
                    stats.misses += 1
                    t0 = time.perf_counter()
                    self._load(i, e, protect, "main")
                    self.telemetry.stall_seconds += time.perf_counter() - t0
                b = self.experts.served(i, cache.bits_of[e])
                self.telemetry.bits_served[b] = self.telemetry.bits_served.get(b, 0) + 1
            g = ggml.Graph(buffer=self._graph_mem)
            outputs, rows_of = [], []
            for e in group:
                rows, slot_k = np.nonzero(ids == e)
                wg, wu, wd = cache.slots[cache.slot_of[e]].weights
                xe = g.input(x[rows])
                outputs.append(g.matmul(wd, g.swiglu(g.matmul(wg, xe), g.matmul(wu, xe))))
                rows_of.append((rows, slot_k))
            for y, (rows, slot_k) in zip(g.compute(outputs, self.threads), rows_of):
                out[rows] += y * weights[rows, slot_k][:, None]
        if lw.shared is not None:
            sg, su, sd, sr = lw.shared
            g = ggml.Graph(buffer=self._graph_mem)
            xi = g.input(x)
            y = g.compute([g.matmul(sd, g.swiglu(g.matmul(sg, xi), g.matmul(su, xi)))], self.threads)[0]
            out += y / (1.0 + np.exp(-(x @ sr.T)))
        return out

    def truncate(self, n: int) -> None:
        self.n_past = max(0, min(n, self.n_past))

    def metrics(self) -> dict:
        """A snapshot for the CLI, server and monitor: speed, memory, cache and I/O counters."""
        import psutil

        t = self.telemetry
        hits = sum(x.hits for x in t.layers)
        misses = sum(x.misses for x in t.layers)
        return {
            "engine": self.name,
            "tokens_decoded": t.tokens,
            "decode_tokens_per_s": t.tokens / t.decode_seconds if t.decode_seconds else None,
            "time_to_first_token_s": t.first_token_seconds,
            "resident_bytes": psutil.Process().memory_info().rss,
            "memory_budget_bytes": self.budget_bytes,
            "expert_cache_bytes": self.cache_bytes,
            "stack_bytes": self.stack.loaded_bytes if self.stack else None,
            "stack_blocks": self.stack.n_loaded if self.stack else None,
            "stack_full_bytes": self.stack.index.full_bytes if self.stack else None,
            "resizes": list(t.resizes[-20:]),
            "cache_slots_per_layer": list(self.config.slots),
            "cache_hits": hits, "cache_misses": misses,
            "expert_loads": misses + sum(x.prefetched for x in t.layers),  # demand loads + prefetches
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "per_layer": [asdict(x) for x in t.layers],
            "bytes_read": t.bytes_read,
            "ssd_mb_per_s": t.bytes_read / t.io_seconds / 1e6 if t.io_seconds else None,
            "stall_seconds": t.stall_seconds,
            "bits_histogram": dict(sorted(t.bits_served.items())),
            "io_mode": self.experts.mode,
            "expert_source": self.experts.kind,
            "trunk": self.trunk.source,
            "policy": self.config.policy,
            "prefetch": self.config.prefetch,
            "threads": self.threads,
            "expert_bits": sorted({int(b) for b in np.unique(self.config.bits)}),
            "expert_conversion": ("none: computed in the file's types" if self.experts.kind == "gguf" else
                                  "native" if native.nested_to_q4_1 is not None else "numpy"),
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.experts.close()
        if self.stack is not None:
            self.stack.close()


