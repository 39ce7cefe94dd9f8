"""Offload bundles: dense weights, the nested-bit expert store, and the model's measured locality."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.data.corpus import EOT, stdlib_corpus, token_stream
from edge.formats import edge_weights
from edge.formats.bundle import Progress, TokenizerInfo, copy_tokenizer
from edge.formats.weights import ModelWeights
from edge.hardware import default_threads
from edge.moe.locality import sch
from edge.moe.policies import DEFAULT_POLICY
from edge.moe.simulate import simulate, simulate_engine, simulate_replies
from edge.moe.trace import record_trace
from edge.quant.nested import NestedLayout, encode
from edge.quant.store import write_store
from edge.runtime.offload.prefetch import prefetch_guess
from edge.runtime.reference import ReferenceEngine
from edge.runtime.tokenizer import HFTokenizer

CALIBRATION_TOKENS = 2048
LOCALITY_WINDOW = 16  # SCH window for cache sizing: the horizon a decode-time cache lives in
REPLY = (24, 64)  # (prompt, reply) tokens of the short replies whose expert loads the planner predicts
PARALLEL_REPLAYS = 1 << 20  # token x layer x size replays beyond which layers replay in a process pool


def calibration_tokens(tokenizer: HFTokenizer, n: int = CALIBRATION_TOKENS) -> list[int]:
    """The first n tokens of the stdlib training split: real text every machine has."""
    texts = stdlib_corpus().train_texts()[:40]
    eot = tokenizer.encode(EOT)
    return token_stream(tokenizer.encode, texts, eot[0] if len(eot) == 1 else 0)[:n]


def routing_and_guesses(weights: ModelWeights, tokens: list[int]):
    """The reference engine's routing of ``tokens`` (a RoutingTrace) and, per layer, the offload
    prefetcher's guess for every token [T, K] from the residual stream entering that layer."""
    s = weights.spec
    engine = ReferenceEngine(weights, n_ctx=512)
    guesses: list[list[list[int]]] = [[] for _ in range(s.n_layers)]

    def on_stream(i: int, x: np.ndarray) -> None:  # the prefetcher's guess for layer i + 1 (0: embeddings)
        if i + 1 < s.n_layers:
            lw = weights.layers[i + 1]
            guesses[i + 1] += [prefetch_guess(x[t : t + 1], lw.ffn_norm, lw.router, s.rms_norm_eps, s.top_k)
                               for t in range(len(x))]

    engine.stream_observers.append(on_stream)
    trace = record_trace(engine, tokens, window=512)
    return trace, [np.asarray(x) for x in guesses]


def measure_locality(weights: ModelWeights, tokens: list[int], window: int = LOCALITY_WINDOW) -> dict:
    """Route calibration text through the reference engine and measure the locality cache sizing
    and the planner use (:func:`locality_from`)."""
    trace, guesses = routing_and_guesses(weights, tokens)
    return locality_from(trace, guesses, window)


def cache_sizes(n_experts: int, top_k: int, points: int = 24) -> list[int]:
    """The cache sizes (slots per layer) at which replays are measured: every size for small
    expert counts, else K..4K densely and a geometric grid up to E (the planner interpolates)."""
    if n_experts - top_k + 1 <= points:
        return list(range(top_k, n_experts + 1))
    dense = list(range(top_k, min(n_experts, 4 * top_k) + 1, max(1, top_k // 2)))
    geo = np.geomspace(4 * top_k, n_experts, points - len(dense) + 1).round().astype(int).tolist()
    return sorted(set(dense) | set(geo) | {n_experts})


def locality_from(trace, guesses, window: int = LOCALITY_WINDOW) -> dict:
    """What a bundle records of its calibration routing: per-layer SCH curves and hotness, the
    online policy's hit rates, and the offload engine's expert loads per token (prefetch included
    and not) replayed in steady use and over short replies, at the cache sizes of
    :func:`cache_sizes` (``sizes``). ``guesses`` None (routing recorded in use, which has no
    prefetcher guesses): the replays are of the engine with prefetching off. Layers replay in
    parallel processes when there is much to replay (model A's 48 layers x 24 sizes x 4 replays of
    2,048 tokens: ~20 min on one core)."""
    E, K, L = trace.n_experts, trace.top_k, trace.n_layers
    if guesses is None:
        guesses = [None] * L
    sizes = cache_sizes(E, K)
    tasks = [(trace.layer(i), None if guesses[i] is None else np.asarray(guesses[i]), E, sizes) for i in range(L)]
    workers = min(default_threads(), L)
    if workers > 1 and trace.n_tokens * L * len(sizes) >= PARALLEL_REPLAYS:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the calling process may hold ggml and I/O threads, which fork would copy mid-state
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            layers = list(pool.map(_layer_replays, *zip(*tasks)))
    else:
        layers = [_layer_replays(*t) for t in tasks]
    # the online policy's hit rate (first uses count as misses), layer mean: the planner predicts
    # expert loads per token from this, not from SCH's future-knowledge ceiling
    online = [round(float(np.mean([x["online"][j] for x in layers])), 5) for j in range(len(sizes))]
    # per layer, for each cache size: the engine sizes caches per layer (allocate_slots), so the
    # planner sums the layers' loads at the sizes the engine will pick
    per_layer = [x["steady"] for x in layers]
    loads = [round(sum(row[j] for row in per_layer), 4) for j in range(len(sizes))]
    prompt, reply = REPLY
    return {"sizes": sizes, "policy": DEFAULT_POLICY,
            "reply": {"prompt_tokens": prompt, "reply_tokens": reply,
                      "layer_loads_per_token": [x["replies"] for x in layers],
                      "layer_demand_loads_per_token": [x["demand_replies"] for x in layers]},
            "window": window, "tokens": trace.n_tokens,
            "sch": [sch(trace.layer(i), E, window).round(5).tolist() for i in range(L)], "policy_hit": online,
            "loads_per_token": loads, "layer_loads_per_token": per_layer,
            "hotness": trace.hotness().round(5).tolist()}


def _layer_replays(ids: np.ndarray, guesses: np.ndarray | None, n_experts: int, sizes: list[int]) -> dict:
    """One layer's replays at every cache size: the online policy's hit rate, loads per token in
    steady use, and over short replies (each from a freshly loaded engine, warm-up after the prompt
    included) with the prefetcher's guesses (None: off) and without."""
    prompt, reply = REPLY
    return {"online": [simulate(ids, n_experts, c, DEFAULT_POLICY) for c in sizes],
            "steady": [round(_steady(ids, guesses, n_experts, c), 4) for c in sizes],
            "replies": [round(simulate_replies(ids, guesses, n_experts, c, DEFAULT_POLICY, prompt, reply), 4)
                        for c in sizes],
            "demand_replies": [round(simulate_replies(ids, None, n_experts, c, DEFAULT_POLICY, prompt, reply), 4)
                               for c in sizes]}


def _steady(ids, guesses, n_experts: int, capacity: int) -> float:
    """Loads per token in steady use, with the prefetcher's guesses (None: prefetching off)."""
    if guesses is None:
        return (1 - simulate(ids, n_experts, capacity, DEFAULT_POLICY)) * ids.shape[1]
    return simulate_engine(ids, guesses, n_experts, capacity, DEFAULT_POLICY)


def populate_offload(weights: ModelWeights, tokenizer_json: Path, tmp: Path, say: Progress,
                     eos: tuple[int, ...], bos: int | None, name: str, source: str, *, bitstack: bool = False) -> dict:
    s = weights.spec
    F, D = s.expert_ffn_size, s.hidden_size
    layout = NestedLayout(((F, D), (F, D), (D, F)))
    say("measuring routing locality on calibration text")
    tokens = calibration_tokens(HFTokenizer(tokenizer_json))
    locality = measure_locality(weights, tokens)
    stack = None
    if bitstack:  # attention matrices as a BitStack stack; dense.safetensors leaves them out
        from edge.builder.stack import build_stack

        stack = build_stack(weights, tokens, tmp / "dense.stack", say=say).to_dict()
    say("writing dense weights")
    edge_weights.save(weights, tmp / "dense.safetensors", "f32", experts=False, stacked=bitstack)

    def records():
        for lw in weights.layers:
            for e in range(s.n_experts):
                yield encode([np.asarray(lw.gate[e]), np.asarray(lw.up[e]), np.asarray(lw.down[e])])

    total = s.n_layers * s.n_experts
    index = write_store(tmp / "experts.bin", layout, s.n_layers, s.n_experts, records(),
                        progress=lambda i: say(f"quantizing experts {i}/{total}"))
    tok_roles = copy_tokenizer(tokenizer_json, tmp)
    from dataclasses import replace

    spec = replace(s, expert_bytes=index.file_bytes, weight_dtype="NESTED2-8", source_format="edge")
    return {
        "name": name, "format": "offload", "weight_type": "nested-2..8", "source": source, "spec": spec,
        "tokenizer": TokenizerInfo(kind="hf", file="tokenizer.json", eos_ids=eos, bos_id=bos),
        "experts": index.to_dict(), "locality": locality, "bitstack": stack,
        "roles": {"dense.safetensors": "weights", "experts.bin": "experts"} | tok_roles
        | ({"dense.stack": "bitstack"} if bitstack else {}),
    }
