"""The planner: (model, device, budget, context) -> a Plan, with a performance model it explains.

Pure: numbers in, numbers out, no I/O. Every predicted figure is a sum of terms printed in
``Plan.reasons``, so a user can see why a plan is fast or slow. The terms:

* bytes a decode step touches: dense weights + K of E experts per layer, at the plan's bits;
* how fast this device streams weights through a matrix-vector kernel: for llama.cpp its measured
  MoE decode streaming rate, for the offload engine (which runs ggml graphs of its own) the
  profiler's ggml Q4_1 GEMV throughput, or for a device profile 70% of its published peak DRAM
  bandwidth (an assumption, stated as one: on this machine GEMV reached 84% of a *copy* benchmark);
* a fixed cost per layer per token (kernel launches, Python), measured by the profiler on the
  embedded default model for llama.cpp and for the offload engine;
* offload only: expert loads per token from the engine's cache policy, with and without its
  prefetcher (off where it does not save loads), replayed on the model's calibration trace at the
  planned cache size, over short replies each from an empty cache (uniform routing when no trace
  exists), each costing its read at the profiler's
  scattered-read speed (timed on the bundle's own store when planning for a bundle on this
  device) plus its checksum and conversion into kernel format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.errors import EdgeError
from edge.moe.sizing import slots_for
from edge.profile import HardwareProfile
from edge.spec import ModelSpec
from edge.units import format_bytes

# Bits per weight of the formats the plan can pick (ggml block layouts: scale/offset included).
BPW = {"q4_1": 5.0, "q8_0": 8.5, "f16": 16.0}
LLAMA_OVERHEAD_BYTES = 64 << 20  # llama.cpp compute buffers and runtime (measured ~60 MB, docs/offload.md)
OFFLOAD_RUNTIME_BYTES = 160 << 20  # Python, numpy, ggml, buffers: measured 150-180 MB before slots
GEMV_SHARE_OF_PEAK = 0.70  # device profiles list peak DRAM bandwidth, not a measured GEMV rate
CRC_BYTES_PER_S = 4e9  # zlib.crc32 when a profile has no measured checksum speed (2-4 GB/s here)
PREFILL_REUSE = 8  # a prompt batch reads each weight once for many tokens; order of magnitude, unvalidated


@dataclass(frozen=True)
class Plan:
    model: str
    device: str
    backend: str  # "llamacpp" or "offload"
    weight_type: str
    bits: int
    budget_bytes: int
    context: int
    threads: int
    cache_slots_per_layer: tuple[int, ...] | None
    prefetch_layers: int
    predicted_peak_bytes: int
    predicted_decode_tok_s: float | None  # None: the device has no measured or published bandwidth
    predicted_prefill_tok_s: float | None
    predicted_ttft_s: float | None
    reasons: tuple[str, ...] = field(default=())
    predicted_loads_per_token: float | None = None  # offload: expert loads per decoded token
    predicted_load_s: float | None = None  # offload: seconds per expert load (read + checksum + convert)


def gemv_stream_bps(gemv_q4_gflops: float) -> float:
    """Bytes of Q4_1 weights per second a ggml matrix-vector product streams (2 flops per weight)."""
    return gemv_q4_gflops * 1e9 / 2 * BPW["q4_1"] / 8


def _stream_bytes_per_s(device: HardwareProfile, backend: str) -> tuple[float | None, str]:
    if backend == "llamacpp" and device.llama_stream_gbps:
        return device.llama_stream_gbps * 1e9, (f"measured llama.cpp MoE decode {device.llama_stream_gbps:.1f} GB/s "
                                                f"of Q4_1 weights")
    if device.gemv_q4_gflops:
        bps = gemv_stream_bps(device.gemv_q4_gflops)
        return bps, f"measured ggml Q4_1 GEMV {device.gemv_q4_gflops:.0f} GFLOP/s = {bps / 1e9:.1f} GB/s of weights"
    if device.memory_bandwidth_gbps:
        bps = device.memory_bandwidth_gbps * 1e9 * GEMV_SHARE_OF_PEAK
        return bps, (f"{GEMV_SHARE_OF_PEAK:.0%} of published peak bandwidth {device.memory_bandwidth_gbps} GB/s "
                     f"(assumed) = {bps / 1e9:.1f} GB/s")
    return None, "unknown: this device has no measured or published memory bandwidth, so no speed is predicted"


def plan(spec: ModelSpec, device: HardwareProfile, *, budget_bytes: int | None = None, context: int = 2048,
         bits: int = 4, locality: dict | None = None, model_name: str = "model",
         backend: str = "auto") -> Plan:
    """Choose a backend and its settings; predict speed and peak memory; refuse with numbers.

    ``locality``: an offload bundle's measured locality (manifest): expert loads per token of the
    engine (cache policy + prefetcher) replayed on the model's calibration trace for C = 1..E slots
    per layer — over 64-token replies from a freshly loaded engine (what edge bench measures) when
    the bundle has them, else in steady use — or the policy's hit rates from older bundles;
    without it, uniform routing."""
    if bits not in (2, 3, 4):
        raise EdgeError(f"plans use 2..4-bit experts, not {bits}")
    if backend not in ("auto", "llamacpp", "offload"):
        raise EdgeError(f"unknown backend {backend!r}; choose auto, llamacpp or offload")
    budget = budget_bytes if budget_bytes is not None else device.usable_memory_bytes
    L, E, K = spec.n_layers, spec.n_experts, spec.top_k
    threads = device.cores_physical
    reasons = []
    wtype = "q4_1" if bits == 4 else f"nested-{bits}"
    q4, q8 = BPW["q4_1"] / 8, BPW["q8_0"] / 8
    experts_q4 = spec.expert_params * q4
    kv16 = 2 * L * spec.n_kv_heads * spec.head_dim * context * 2  # llama.cpp: f16 K and V
    whole = spec.dense_params * q4 + experts_q4 + kv16 + LLAMA_OVERHEAD_BYTES
    prompt = 64  # tokens: the time-to-first-token prediction assumes a 64-token prompt
    fits = whole <= budget
    if backend == "llamacpp" or (backend == "auto" and fits):
        stream, stream_why = _stream_bytes_per_s(device, "llamacpp")
        reasons.append(f"weights stream at {stream_why}")
        if not fits:
            raise EdgeError(f"needs {format_bytes(whole)} to run whole with llama.cpp at 4 bits; budget is "
                            f"{format_bytes(budget)} (use the offload backend)")
        active = spec.decode_bytes(BPW["q4_1"], BPW["q4_1"])
        reasons.append(f"fits: {format_bytes(whole)} (weights {format_bytes(whole - kv16 - LLAMA_OVERHEAD_BYTES)}, "
                       f"KV for {context} tokens {format_bytes(kv16)}, runtime {format_bytes(LLAMA_OVERHEAD_BYTES)}) "
                       f"<= budget {format_bytes(budget)} -> llama.cpp runs it whole, memory-mapped")
        decode = prefill = ttft = None
        if stream:
            fixed_s, fixed_why = _fixed(device.llama_layer_us, L, "llama.cpp")
            weights_s, weights_why = _weights_s(active, whole - kv16 - LLAMA_OVERHEAD_BYTES, stream, device,
                                                device.llama_layer_us is not None)
            step = weights_s + fixed_s
            decode, prefill = 1 / step, 1 / (weights_s / PREFILL_REUSE + fixed_s)
            ttft = prompt / prefill
            reasons.append(f"decode: {weights_why} + {fixed_why} -> {decode:.1f} tokens/s")
        return Plan(model_name, device.name, "llamacpp", wtype, bits, budget, context, threads, None, 0,
                    int(whole), decode, prefill, ttft, tuple(reasons))
    stream, stream_why = _stream_bytes_per_s(device, "offload")
    reasons.append(f"weights stream at {stream_why}")
    slot = spec.expert_params / (L * E) * q4
    kv32 = kv16 * 2  # the offload engine keeps K and V in f32
    fixed_bytes = spec.dense_params * q8 + kv32 + OFFLOAD_RUNTIME_BYTES
    room = budget * 0.9 - fixed_bytes - (48 << 20)  # the engine's headroom (edge/moe/runtime.py)
    if room < L * K * slot:
        raise EdgeError(
            f"needs {format_bytes(fixed_bytes + L * K * slot + (48 << 20) + budget * 0.1)} at {bits} bits with "
            f"offloading ({format_bytes(fixed_bytes)} dense + runtime + KV, {L} layers x {K} experts of "
            f"{format_bytes(slot)}); budget is {format_bytes(budget)}")
    read_mbps = device.storage_chunk_read_mbps or device.storage_seq_read_mbps
    if not read_mbps:
        raise EdgeError(f"device '{device.name}' has no storage read speed to plan offloading with")
    locality = locality or {}
    slots = slots_for(int(room // slot), L, E, K, locality.get("sch"))  # as the engine will size them
    loads, loads_why = _loads_per_token(locality, slots, L, E, K)
    prefetch, prefetch_why = 1, "prefetch: the next layer's guessed experts load while this layer computes"
    demand = (locality.get("reply") or {}).get("layer_demand_loads_per_token")
    if demand:
        without = _at_slots(demand, slots)
        if without <= loads:  # the model credits no overlap: the loads cost the same on either thread
            prefetch, prefetch_why = 0, (
                f"prefetch off: {without:.1f} loads per token without it vs {loads:.1f} with it (its wrong guesses "
                f"load too), and every core computes, so its loads do not hide behind the compute (measured on a "
                f"2-core VM: prefetching cost 16-25%, docs/planner.md)")
            reply = locality["reply"]
            loads, loads_why = without, (f"the engine's cache policy, prefetcher off, replayed on the model's calibration "
                                         f"trace, per layer, over {reply['reply_tokens']}-token replies after "
                                         f"{reply['prompt_tokens']}-token prompts from an empty cache")
    cache_why = f"{slots_text(slots)} of {E}"
    load_s, load_why = expert_load_s(spec, device, bits, read_mbps)
    peak = fixed_bytes + sum(slots) * slot + (48 << 20)
    if stream is None:
        reasons.append(f"does not fit whole: {format_bytes(whole)} > budget {format_bytes(budget)} -> offload experts; "
                       f"cache {cache_why} experts per layer, {loads:.1f} loads per token")
        return Plan(model_name, device.name, "offload", wtype, bits, budget, context, threads,
                    slots, prefetch, int(peak), None, None, None, tuple(reasons), loads, load_s)
    weights_s, weights_why, fixed_s, fixed_why = offload_compute_s(spec, device, slots, stream)
    step = weights_s + fixed_s + loads * load_s
    reasons += [f"does not fit whole: {format_bytes(whole)} > budget {format_bytes(budget)} -> offload experts",
                f"cache: {cache_why} experts per layer ({sum(slots)} slots, {format_bytes(sum(slots) * slot)}) after "
                f"{format_bytes(fixed_bytes)} dense + runtime + KV and the engine's headroom",
                f"{loads:.1f} expert loads per token ({loads_why})", prefetch_why,
                f"each load: {load_why}",
                f"decode: {weights_why} + {fixed_why} + {loads * load_s * 1e3:.0f} ms "
                f"loading -> {1 / step:.2f} tokens/s"]
    prefill = 1 / (weights_s / PREFILL_REUSE + fixed_s)
    ttft = prompt / prefill + L * min(E, prompt * K) * load_s  # a prompt touches nearly every expert
    return Plan(model_name, device.name, "offload", wtype, bits, budget, context, threads,
                slots, prefetch, int(peak), 1 / step, prefill, ttft, tuple(reasons), loads, load_s)


def expert_load_s(spec: ModelSpec, device: HardwareProfile, bits: int, read_mbps: float) -> tuple[float, str]:
    """Seconds one expert load costs the offload engine: its b-bit prefix read at ``read_mbps`` plus
    latency, checksummed, converted into a Q4_1 slot, all as measured on this device (on the
    bundle's own store when planned for one), times how much dearer the engine's loads measured on
    that bundle than those steps timed alone (profile_decode.measure_engine_load_factors)."""
    L, E = spec.n_layers, spec.n_experts
    slot = spec.expert_params / (L * E) * BPW["q4_1"] / 8
    read_bytes = spec.expert_params / (L * E) * 8.5 / 8 * (bits / 8.5)  # a b-bit prefix of an 8.5-bit record
    # a 2-bit prefix has half the bit planes to unpack: 3.1 vs 3.8-4.0 ms per synthetic expert here
    convert_mbps = device.convert_2bit_mbps if bits == 2 and device.convert_2bit_mbps else device.convert_mbps
    convert_s = slot / (convert_mbps * 1e6) if convert_mbps else 0.0
    latency_s = (device.storage_chunk_latency_ms or 0.0) / 1e3
    crc_s = read_bytes / (device.checksum_mbps * 1e6 if device.checksum_mbps else CRC_BYTES_PER_S)
    parts = latency_s + read_bytes / (read_mbps * 1e6) + crc_s + convert_s
    measured = device.engine_load_factor_2bit if bits == 2 and device.engine_load_factor_2bit else \
        device.engine_load_factor
    factor = measured or 1.0
    why = (f"{format_bytes(read_bytes)} at {read_mbps:.0f} MB/s + {latency_s * 1e3:.1f} ms latency"
           + (f" + checksum at {device.checksum_mbps:.0f} MB/s" if device.checksum_mbps else " + checksum")
           + (f" + conversion at {convert_mbps:.0f} MB/s" if convert_mbps else "") + f" = {parts * 1e3:.1f} ms"
           + (f", x {factor:.2f} measured in the engine on this bundle (its loads vs the steps timed alone) "
              f"= {parts * factor * 1e3:.1f} ms" if measured else ""))
    return parts * factor, why


def offload_compute_s(spec: ModelSpec, device: HardwareProfile, slots: tuple[int, ...],
                      stream: float) -> tuple[float, str, float, str]:
    """(weights seconds, why, fixed seconds, why) of one offload decode step, loads aside: dense
    weights at Q8_0 and K experts at Q4_1 streamed, plus the engine's fixed cost per layer."""
    q4, q8 = BPW["q4_1"] / 8, BPW["q8_0"] / 8
    slot = spec.expert_params / (spec.n_layers * spec.n_experts) * q4
    active = spec.decode_bytes(BPW["q8_0"], BPW["q4_1"])
    weights_s, weights_why = _weights_s(active, spec.dense_params * q8 + sum(slots) * slot, stream, device,
                                        device.offload_layer_us is not None)
    fixed_s, fixed_why = _fixed(device.offload_layer_us, spec.n_layers, "the offload engine")
    return weights_s, weights_why, fixed_s, fixed_why


def slots_text(slots: tuple[int, ...] | None) -> str:
    """'3' for a uniform cache, '2-3' when layers differ."""
    if not slots:
        return "-"
    return str(slots[0]) if min(slots) == max(slots) else f"{min(slots)}-{max(slots)}"


def _at_slots(per_layer: list[list[float | None]], slots: tuple[int, ...]) -> float:
    """Loads per token summed over the layers, each layer's figure read at its own cache size
    (``per_layer[i][c - 1]``: layer i with c slots)."""
    return sum(row[c - 1] for row, c in zip(per_layer, slots))


def _loads_per_token(locality: dict, slots: tuple[int, ...], L: int, E: int, K: int) -> tuple[float, str]:
    reply = locality.get("reply")
    if reply:  # what edge bench measures: a short reply from a freshly loaded engine
        loads = _at_slots(reply["layer_loads_per_token"], slots)
        steady = locality.get("layer_loads_per_token")
        steady_text = (f"; {_at_slots(steady, slots):.1f} per token in steady use"
                       if steady else "")
        return loads, (f"the engine's cache policy and prefetcher replayed on the model's calibration trace, per "
                       f"layer, over {reply['reply_tokens']}-token replies after {reply['prompt_tokens']}-token "
                       f"prompts from an empty cache{steady_text}")
    per_layer = locality.get("layer_loads_per_token")
    if per_layer:
        return (_at_slots(per_layer, slots),
                "the engine's cache policy and prefetcher replayed on the model's calibration trace, per layer")
    c = sum(slots) // L  # older bundles: one figure per uniform cache size
    replayed = locality.get("loads_per_token")
    if replayed and replayed[c - 1] is not None:
        return replayed[c - 1], f"the engine replayed on the model's calibration trace at {c} slots per layer"
    hits = locality.get("policy_hit")
    if hits:
        return L * K * (1 - hits[c - 1]), f"hit rate {hits[c - 1]:.2f} of the cache policy on the model's trace"
    return L * K * (1 - c / E), f"hit rate {c / E:.2f}: uniform routing assumed, no trace"


def _weights_s(active: float, resident: float, stream: float, device: HardwareProfile,
               fixed_measured: bool) -> tuple[float, str]:
    """Seconds per token spent reading weights: the active bytes at the streaming rate, or none
    beyond the (measured) fixed cost when every resident weight fits in the last-level cache. The
    fixed-cost probes run the embedded model, which is cache-resident, so its reads are inside
    them; on this VM (32 MB cache) also counting DRAM time for it put the fixed cost at 17 µs per
    layer instead of ~50 and predicted the default model 50% fast."""
    if fixed_measured and device.llc_bytes and resident <= device.llc_bytes:
        return 0.0, (f"all {format_bytes(resident)} of weights stay in the {format_bytes(device.llc_bytes)} "
                     f"last-level cache (their reads are inside the measured fixed cost)")
    return active / stream, f"{format_bytes(active)} of weights per token in {active / stream * 1e3:.2f} ms"


def _fixed(per_layer_us: float | None, n_layers: int, who: str) -> tuple[float, str]:
    if per_layer_us is None:
        return 0.0, f"{who}'s fixed cost per layer (not measured on this device: left out, so speed is an upper bound)"
    return n_layers * per_layer_us * 1e-6, f"{n_layers} x {per_layer_us:.0f} µs fixed cost per layer ({who}, measured)"
