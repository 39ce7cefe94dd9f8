"""Profiler probes that decode with a real runtime: the fixed cost per layer of llama.cpp and of the
offload engine (the embedded default model, whose weights stay in the CPU cache, so its decode
time is almost all fixed cost), and the rate at which llama.cpp streams the weights of a MoE model
too large for any CPU cache (a generated Q4_1 MoE GGUF).

Why the last one exists: llama.cpp's MoE decode (``mul_mat_id`` over the routed experts) streams
Q4_1 weights 15-17 GB/s on this VM where the profiler's one-graph ggml GEMV probe reaches
12-13 GB/s, so a llama.cpp plan predicted from the GEMV rate was 15-20% slow (docs/planner.md).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np

from edge.hardware import default_threads
from edge.paths import cache_dir
from edge.plan.costs import BPW, expert_load_s, gemv_stream_bps, offload_compute_s
from edge.runtime.offload.options import OffloadOptions

# The streaming probe's model: Qwen1.5-MoE-like matrix shapes (hidden 2048, experts 1408 wide),
# 3 layers, top-2 of 8 experts: 57 MB of Q4_1 weights per token, beyond the last-level cache of
# the devices we target (32 MB here), so every token reads its weights from DRAM.
PROBE_SHAPE = dict(n_layers=3, hidden_size=2048, n_heads=16, n_kv_heads=4, head_dim=128, n_experts=8, top_k=2,
                   expert_ffn_size=1408)


PROBE_PROMPT = [1, 2, 3, 4]


def _per_token_s(be, passes: int = 5, tokens: int = 64) -> float:
    """Seconds per greedy decode step as a decode loop sees them: the mean over ``tokens`` steps
    after a short prompt (occasional slow steps included, as they are in any measured reply), the
    median over ``passes`` passes from a fresh context (one slow moment of this VM does not move
    it). A median of per-batch times, used before, left out the slow steps and read ~8% fast."""
    means = []
    for _ in range(passes):
        be.truncate(0)
        logits = be.eval(PROBE_PROMPT)
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = be.eval([int(np.argmax(logits))])
        means.append((time.perf_counter() - t0) / tokens)
    return statistics.median(means)


def _probe_weights_s(gemv_q4_gflops: float, dense_bpw: float, expert_bpw: float,
                     llc: int | None) -> tuple[float, int]:
    """(seconds the embedded default model's weights take to stream per token at the measured GEMV
    rate, its layer count): the fixed-cost probes below subtract this, because the planner adds
    every model's weight-streaming time on its own. When the whole probe model fits in the
    last-level cache (4.7 MB at Q8_0; 32 MB cache here) its weights never come from DRAM, so
    there is nothing to subtract: subtracting DRAM time made the fixed cost 17 µs per layer where
    a 4-layer decode takes 200 µs, and the default model's prediction 50% fast."""
    spec = _default_spec()
    if llc and (spec.dense_params * dense_bpw + spec.expert_params * expert_bpw) / 8 <= llc:
        return 0.0, spec.n_layers
    return spec.decode_bytes(dense_bpw, expert_bpw) / gemv_stream_bps(gemv_q4_gflops), spec.n_layers


def default_q8_gguf() -> Path:
    """The embedded default model as a Q8_0 GGUF in edge's cache (written once): the probes' model."""
    from edge.formats.gguf_write import write_gguf
    from edge.formats.hf import load_weights
    from edge.models import default_model_path

    path = cache_dir("gguf") / "profile-default-q8_0.gguf"
    if not path.is_file():
        d = default_model_path()
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        write_gguf(load_weights(d), d / "tokenizer.json", tmp, outtype="q8_0", bos_id=0, eos_id=0)
        os.replace(tmp, path)
    return path


def llama_layer_us(gemv_q4_gflops: float, llc: int | None = None) -> float | None:
    """llama.cpp's fixed cost per layer per decoded token, from the embedded default model (Q8_0,
    under 1 MB streamed per token: nearly all of its decode time is this fixed cost)."""
    from edge.runtime.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(default_q8_gguf(), n_ctx=256, n_threads=default_threads())
    try:
        per_token = _per_token_s(be)
    finally:
        be.close()
    weights_s, n_layers = _probe_weights_s(gemv_q4_gflops, 8.5, 8.5, llc)
    return max(0.0, per_token - weights_s) / n_layers * 1e6


def offload_layer_us(gemv_q4_gflops: float, llc: int | None = None) -> float:
    """The offload engine's fixed cost per layer per decoded token: the embedded default model
    (4 layers, every expert resident, so no loads) decoding, prefetcher off as plans run it where
    it does not save loads (with it on, each layer also pays the router product of its guess)."""
    from edge.builder.bundles import build

    bundle = cache_dir() / "profile-default-offload"
    if not (bundle / "manifest.json").is_file():
        build(None, bundle, format="offload", force=True)
    be, _ = open_engine(bundle, OffloadOptions(prefetch=False), n_ctx=256)
    try:
        for layer in range(len(be.caches)):  # every expert resident before timing
            for e in range(be.spec.n_experts):
                if e not in be.caches[layer].slot_of:
                    be._load(layer, e, set(), "main")
        per_token = _per_token_s(be)
    finally:
        be.close()
    weights_s, n_layers = _probe_weights_s(gemv_q4_gflops, 8.5, 5.0, llc)  # dense Q8_0, experts Q4_1
    return max(0.0, per_token - weights_s) / n_layers * 1e6


def moe_probe_gguf() -> Path:
    """The streaming probe's Q4_1 MoE GGUF (built once per machine: 165 MB, ~5 s here):
    Mixtral architecture, :data:`PROBE_SHAPE`, the default model's tokenizer. Its weights are
    random and every expert of a layer holds the same values (one matrix in memory while writing,
    not 8); in the file each expert has its own bytes, so decoding reads them all from DRAM."""
    from edge.formats.gguf_write import write_gguf
    from edge.formats.weights import LayerWeights, ModelWeights
    from edge.models import default_model_path

    path = cache_dir("gguf") / "profile-moe-q4_1.gguf"
    if path.is_file():
        return path
    d = default_model_path()
    s = dataclasses.replace(_default_spec(), **PROBE_SHAPE)
    rng = np.random.default_rng(0)
    D, F, E, V = s.hidden_size, s.expert_ffn_size, s.n_experts, s.vocab_size
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    def same_for_each_expert(m: np.ndarray) -> np.ndarray:
        return np.broadcast_to(m, (E, *m.shape))

    ones = np.ones(D, np.float32)
    gate, up, down = rand(F, D), rand(F, D), rand(D, F)
    layers = [LayerWeights(attn_norm=ones, wq=rand(q, D), wk=rand(kv, D), wv=rand(kv, D), wo=rand(D, q), ffn_norm=ones,
                           router=rand(E, D), gate=same_for_each_expert(gate), up=same_for_each_expert(up),
                           down=same_for_each_expert(down)) for _ in range(s.n_layers)]
    weights = ModelWeights(spec=s, embed=rand(V, D), norm=ones, lm_head=rand(V, D), layers=layers)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        write_gguf(weights, d / "tokenizer.json", tmp, outtype="q4_1", bos_id=0, eos_id=0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def llama_stream_gbps(layer_us: float | None, llc: int | None = None) -> float | None:
    """GB/s of Q4_1 weights llama.cpp streams while decoding a MoE model beyond the CPU cache: the
    probe model's weights per token over its decode time less the measured fixed cost per layer
    (``layer_us``). None when the probe's weights per token are not well beyond this device's
    last-level cache (1.5x): part of them would be read from the cache, not DRAM."""
    from edge.formats.gguf_read import read_spec
    from edge.runtime.llamacpp import LlamaCppBackend

    path = moe_probe_gguf()
    spec = read_spec(path)
    active = spec.decode_bytes(BPW["q4_1"], BPW["q4_1"])
    if llc and active < 1.5 * llc:
        return None
    be = LlamaCppBackend(path, n_ctx=256, n_threads=default_threads())
    try:
        per_token = _per_token_s(be, passes=3)
    finally:
        be.close()
    weights_s = per_token - spec.n_layers * (layer_us or 0.0) * 1e-6
    return active / weights_s / 1e9 if weights_s > 0 else None


def _ort_bundle(name: str, source: Path | None) -> Path:
    """An int4 ONNX bundle of ``source`` (None: the embedded model) in edge's cache, built once."""
    from edge.builder.bundles import build
    from edge.builder.onnx_graph import current

    bundle = cache_dir() / name
    if not current(bundle):
        build(source, bundle, format="onnx", weight_type="int4", force=True)
    return bundle


def _ort_backend(bundle: Path):
    from edge.formats.bundle import read_manifest
    from edge.runtime.ort import OrtBackend

    m = read_manifest(bundle)
    return OrtBackend(bundle / "model.onnx", m.spec, n_ctx=256, max_context=m.onnx["max_context"],
                      n_threads=default_threads())


def ort_layer_us(gemv_q4_gflops: float, llc: int | None = None) -> float | None:
    """ONNX Runtime's fixed cost per layer per decoded token (CPU provider), from the embedded model
    as an int4 ONNX bundle (3 MB: cache-resident, so its decode time is nearly all fixed cost).
    None where the bundle cannot be built here (onnx-ir not installed: the `onnx` extra)."""
    import importlib.util

    if importlib.util.find_spec("onnx_ir") is None:
        return None
    from edge.plan.costs import ort_bytes

    be = _ort_backend(_ort_bundle("profile-default-onnx-int4", None))
    try:
        per_token = _per_token_s(be)
    finally:
        be.close()
    spec = be.spec
    whole, active = ort_bytes(spec)
    weights_s = 0.0 if llc and whole <= llc else active / gemv_stream_bps(gemv_q4_gflops)
    return max(0.0, per_token - weights_s) / spec.n_layers * 1e6


def layer_costs(gemv_q4_gflops: float, llc: int | None, with_ort: bool, rounds: int = 3) -> tuple[float, float | None]:
    """(llama.cpp's, ONNX Runtime's) fixed cost per layer, each the median of ``rounds`` probes taken
    in turn, so that a slow minute of a shared machine falls on both (the planner compares them)."""
    llama, ort = [], []
    for _ in range(rounds):
        llama.append(llama_layer_us(gemv_q4_gflops, llc=llc))
        if with_ort:
            ort.append(ort_layer_us(gemv_q4_gflops, llc=llc))
    measured = [x for x in ort if x is not None]
    return statistics.median(llama), statistics.median(measured) if measured else None


def ort_stream_ratio(ort_us: float | None, llama_us: float | None) -> float | None:
    """How fast ONNX Runtime streams a MoE's weights relative to llama.cpp: bytes of weights per
    second decoding the streaming probe's model (llama.cpp on its Q4_1 GGUF, ONNX Runtime on that
    file exported to int4 ONNX), each less its measured fixed cost per layer. A ratio, not a rate,
    so that it holds whether or not this device's cache holds the probe (the planner multiplies
    llama.cpp's streaming rate, measured or from ggml's GEMV, by it)."""
    if ort_us is None or llama_us is None:
        return None
    from edge.formats.gguf_read import read_spec
    from edge.plan.costs import ort_bytes
    from edge.runtime.llamacpp import LlamaCppBackend

    path = moe_probe_gguf()
    spec = read_spec(path)
    be = LlamaCppBackend(path, n_ctx=256, n_threads=default_threads())
    try:
        llama_s = _per_token_s(be, passes=3) - spec.n_layers * llama_us * 1e-6
    finally:
        be.close()
    be = _ort_backend(_ort_bundle("profile-moe-onnx-int4", path))
    try:
        ort_s = _per_token_s(be, passes=3) - spec.n_layers * ort_us * 1e-6
    finally:
        be.close()
    if llama_s <= 0 or ort_s <= 0:
        return None
    return (ort_bytes(spec)[1] / ort_s) / (spec.decode_bytes(BPW["q4_1"], BPW["q4_1"]) / llama_s)


def measure_engine_load_factors(bundle: Path, device, bits: tuple[int, ...] = (4, 2),
                                seconds: float = 2.0) -> dict[int, float | None]:
    """How much dearer an expert load is inside the offload engine than the sum of its probed steps
    (read, checksum, conversion, each timed alone on the bundle's store), for each of ``bits``:
    :func:`measure_engine_loading`, then :func:`engine_load_factors`. On this VM ~1.0-1.5
    (docs/planner.md): the steps timed alone run on warm buffers and caches that the engine's
    loads, between layers of compute, do not find. None for a width when loads are too small a
    share of the step to tell; all None when the device has no GEMV rate to take the compute out."""
    if not device.gemv_q4_gflops or not (device.storage_chunk_read_mbps or device.storage_seq_read_mbps):
        return {b: None for b in bits}
    return engine_load_factors(bundle, device, measure_engine_loading(bundle, bits, seconds))


def measure_engine_loading(bundle: Path, bits: tuple[int, ...] = (4, 2),
                           seconds: float = 2.0) -> dict[int, tuple[float, float]]:
    """The offload engine on ``bundle``, loaded once, decoding with the smallest cache (top-k slots
    per layer, so loads dominate) at each of ``bits`` for ~``seconds``: {bits: (seconds per token,
    expert loads per token)}."""
    from edge.formats.bundle import read_manifest

    spec = read_manifest(bundle).spec
    L, E, K = spec.n_layers, spec.n_experts, spec.top_k
    slots = (K,) * L
    out: dict[int, tuple[float, float]] = {}
    # prefetch off: every load is a demand load on the main thread, as plans run (edge/plan/planner.py)
    be, tok = open_engine(bundle, OffloadOptions(pin_bits=True, prefetch=False), n_ctx=128)
    try:
        prompt = tok.encode("import os\nimport sys\n")
        for b in bits:
            be.truncate(0)
            be.set_cache(slots, np.full((L, E), b))  # empty caches, every expert at b bits
            logits = be.eval(prompt)
            for _ in range(2):  # past the prompt's group-wise loads
                logits = be.eval([int(np.argmax(logits))])
            before, n, t0 = be.metrics()["expert_loads"], 0, time.perf_counter()
            while n < 3 or (n < 16 and time.perf_counter() - t0 < seconds):
                logits = be.eval([int(np.argmax(logits))])
                n += 1
            out[b] = ((time.perf_counter() - t0) / n, (be.metrics()["expert_loads"] - before) / n)
    finally:
        be.close()
    return out


def engine_load_factors(bundle: Path, device, measured: dict[int, tuple[float, float]]) -> dict[int, float | None]:
    """Each width's factor from :func:`measure_engine_loading`'s numbers: the time the loads took
    (the step less the planner's compute terms for the smallest cache) per load, over what the
    device's probed steps predict for one."""
    from edge.formats.bundle import read_manifest

    spec = read_manifest(bundle).spec
    read_mbps = device.storage_chunk_read_mbps or device.storage_seq_read_mbps
    weights_s, _, fixed_s, _ = offload_compute_s(spec, device, (spec.top_k,) * spec.n_layers,
                                                 gemv_stream_bps(device.gemv_q4_gflops))
    alone = dataclasses.replace(device, engine_load_factor=None, engine_load_factor_2bit=None)
    factors: dict[int, float | None] = {}
    for b, (per_token, per_token_loads) in measured.items():
        loading = per_token - weights_s - fixed_s
        ok = per_token_loads > 0 and loading >= 0.3 * per_token
        factors[b] = loading / per_token_loads / expert_load_s(spec, alone, b, read_mbps)[0] if ok else None
    return factors


def open_engine(bundle: Path, options, *, n_ctx: int):
    """The offload engine on ``bundle`` with ``options`` and no budget, and its tokenizer: the
    probes time the engine itself, not a deployed plan."""
    from edge.formats.bundle import read_manifest
    from edge.runtime.offload.open import open_offload
    from edge.runtime.tokenizer import HFTokenizer

    manifest = read_manifest(bundle)
    engine = open_offload(bundle, manifest, budget=None, options=options.resolved(), n_ctx=n_ctx,
                          threads=default_threads())
    return engine, HFTokenizer(bundle / manifest.tokenizer.file, manifest.tokenizer.eos_ids)


def _default_spec():
    from edge.formats.hf import read_spec
    from edge.models import default_model_path

    return read_spec(default_model_path())
