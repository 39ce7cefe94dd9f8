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
  device) plus its checksum and conversion into kernel format. A read is what the expert store
  really transfers: the record's scale/offset header and b bit planes, in whole 4 KiB blocks.

The engine's cache is sized by the same functions (edge/moe/sizing.py: headroom, slots per layer
from SCH), so a plan's slots are the engine's. Prefill (time to first token) is not predicted:
the model for it was never validated; ``edge bench`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from edge.errors import EdgeError
from edge.hardware import HardwareProfile
from edge.moe.sizing import MARGIN_BYTES, cache_room, headroom_bytes, scratch_bytes, slots_for, slots_within
from edge.plan.costs import (
    BPW,
    LLAMA_OVERHEAD_BYTES,
    OFFLOAD_RUNTIME_BYTES,
    expert_load_s,
    fixed_s,
    offload_compute_s,
    ort_bytes,
    slot_bytes,
    staging_bytes,
    stored_compute_s,
    stored_load_s,
    stream_bytes_per_s,
    weights_s,
)
from edge.spec import ModelSpec, StoredExperts
from edge.units import format_bytes

BACKENDS = ("auto", "llamacpp", "offload", "ort")
# ONNX Runtime replaces llama.cpp only where predicted this much faster: on the default model the
# two measured within 7% of each other (docs/ort.md), inside the probes' run-to-run spread.
ORT_MARGIN = 1.1


@dataclass(frozen=True)
class Plan:
    """What runs: the backend and its settings, with the predictions and the reasons behind them.
    A deployed bundle keeps its Plan in plan.json, and loading the bundle runs exactly this."""

    model: str
    device: str
    backend: str  # "llamacpp", "offload", "ort" (ONNX Runtime) or "d2d" (across peers: edge.sdk.group)
    weight_type: str
    bits: int
    budget_bytes: int
    context: int
    threads: int
    cache_slots_per_layer: tuple[int, ...] | None
    prefetch_layers: int
    predicted_peak_bytes: int
    predicted_decode_tok_s: float | None  # None: the device has no measured or published bandwidth
    reasons: tuple[str, ...] = field(default=())
    predicted_loads_per_token: float | None = None  # offload: expert loads per decoded token
    predicted_load_s: float | None = None  # offload: seconds per expert load (read + checksum + convert)
    peers: tuple[str, ...] = ()  # d2d: host:port of the members the model runs across (placed again at load)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Written by earlier versions, no longer predicted (a prefill model that was never validated).
_RETIRED = ("predicted_prefill_tok_s", "predicted_ttft_s")


def plan_from_dict(data: dict, where: str) -> Plan:
    """A Plan from its JSON object (plan.json); anything malformed is one EdgeError naming the field."""
    from pydantic import TypeAdapter, ValidationError

    from edge.errors import field_error

    data = {k: v for k, v in data.items() if k not in _RETIRED}
    try:
        return TypeAdapter(Plan).validate_python(data, strict=False)
    except ValidationError as e:
        raise EdgeError(field_error(where, e)) from None


def plan(spec: ModelSpec, device: HardwareProfile, *, budget_bytes: int | None = None, context: int = 2048,
         bits: int = 4, locality: dict | None = None, model_name: str = "model",
         backend: str = "auto", stored: StoredExperts | None = None) -> Plan:
    """Choose a backend and its settings; predict decode speed and peak memory; refuse with numbers.

    ``locality``: an offload bundle's measured locality (manifest): expert loads per token of the
    engine (cache policy + prefetcher) replayed on the model's calibration trace for C = 1..E slots
    per layer — over 64-token replies from a freshly loaded engine (what edge bench measures) when
    the bundle has them, else in steady use — or the policy's hit rates from older bundles;
    without it, uniform routing.

    ``stored``: the model is a GGUF read straight from the file (edge.formats.gguf_read
    .stored_experts): an offload plan computes and reads its tensors in their own types."""
    if bits not in (2, 3, 4):
        raise EdgeError(f"plans use 2..4-bit experts, not {bits}")
    if backend not in BACKENDS:
        raise EdgeError(f"unknown backend {backend!r}; choose auto, llamacpp, offload or ort")
    budget = budget_bytes if budget_bytes is not None else device.usable_memory_bytes
    L, E, K = spec.n_layers, spec.n_experts, spec.top_k
    threads = device.cores_physical
    reasons = []
    wtype = "q4_1" if bits == 4 else f"nested-{bits}"
    q4, q8 = BPW["q4_1"] / 8, BPW["q8_0"] / 8
    kv16 = 2 * L * spec.n_kv_heads * spec.head_dim * context * 2  # llama.cpp: f16 K and V
    weights = spec.dense_params * q4 + spec.expert_params * q4
    whole = weights + kv16 + LLAMA_OVERHEAD_BYTES
    fits = whole <= budget
    if backend == "ort":
        return _ort_plan(spec, device, budget, context, model_name, threads)
    if backend == "llamacpp" or (backend == "auto" and fits):
        stream, stream_why = stream_bytes_per_s(device, "llamacpp")
        reasons.append(f"weights stream at {stream_why}")
        if not fits:
            raise EdgeError(f"needs {format_bytes(whole)} to run whole with llama.cpp at 4 bits; budget is "
                            f"{format_bytes(budget)} (use the offload backend)")
        reasons.append(f"fits: {format_bytes(whole)} (weights {format_bytes(weights)}, KV for {context} tokens "
                       f"{format_bytes(kv16)}, runtime {format_bytes(LLAMA_OVERHEAD_BYTES)}) <= budget "
                       f"{format_bytes(budget)} -> llama.cpp runs it whole, memory-mapped")
        decode = None
        if stream:
            active = spec.decode_bytes(BPW["q4_1"], BPW["q4_1"])
            f_s, f_why = fixed_s(device.llama_layer_us, L, "llama.cpp")
            w_s, w_why = weights_s(active, weights, stream, device, device.llama_layer_us is not None)
            decode = 1 / (w_s + f_s)
            reasons.append(f"decode: {w_why} + {f_why} -> {decode:.1f} tokens/s")
        if backend == "auto" and decode is not None:
            ort = _ort_instead(spec, device, budget, context, model_name, threads, decode)
            if isinstance(ort, Plan):
                return ort
            reasons.append(ort)
        return Plan(model_name, device.name, "llamacpp", wtype, bits, budget, context, threads, None, 0,
                    int(whole), decode, tuple(reasons))
    if stored is not None:
        return _gguf_offload(spec, device, stored, budget, context, kv16 * 2, locality or {}, model_name, whole, threads)
    stream, stream_why = stream_bytes_per_s(device, "offload")
    reasons.append(f"weights stream at {stream_why}")
    slot = slot_bytes(spec)
    kv32 = kv16 * 2  # the offload engine keeps K and V in f32
    # what the engine holds beside its cache (prefetch planned off: one loading thread's staging)
    held = int(spec.dense_params * q8 + kv32 + scratch_bytes(spec) + staging_bytes(spec) + OFFLOAD_RUNTIME_BYTES)
    room = cache_room(budget, held)  # as the engine computes it (edge/runtime/offload/budget.py)
    if room < L * K * slot:
        raise EdgeError(
            f"needs {format_bytes(held + L * K * slot + headroom_bytes(budget))} at {bits} bits with offloading "
            f"({format_bytes(held)} dense + runtime + KV, {L} layers x {K} experts of {format_bytes(slot)}, "
            f"headroom {format_bytes(headroom_bytes(budget))}); budget is {format_bytes(budget)}")
    read_mbps = device.storage_chunk_read_mbps or device.storage_seq_read_mbps
    if not read_mbps:
        raise EdgeError(f"device '{device.name}' has no storage read speed to plan offloading with")
    locality = locality or {}
    slots = slots_for(int(room // slot), L, E, K, locality.get("sch"))  # as the engine will size them
    loads, loads_why = _loads_per_token(locality, slots, L, E, K)
    prefetch, prefetch_why = 1, "prefetch: the next layer's guessed experts load while this layer computes"
    demand = (locality.get("reply") or {}).get("layer_demand_loads_per_token")
    if demand:
        without = _at_slots(demand, slots, locality.get("sizes"))
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
    peak = held + sum(slots) * slot + MARGIN_BYTES
    if stream is None:
        reasons.append(f"does not fit whole: {format_bytes(whole)} > budget {format_bytes(budget)} -> offload experts; "
                       f"cache {cache_why} experts per layer, {loads:.1f} loads per token")
        return Plan(model_name, device.name, "offload", wtype, bits, budget, context, threads,
                    slots, prefetch, int(peak), None, tuple(reasons), loads, load_s)
    w_s, w_why, f_s, f_why = offload_compute_s(spec, device, slots, stream)
    step = w_s + f_s + loads * load_s
    reasons += [f"does not fit whole: {format_bytes(whole)} > budget {format_bytes(budget)} -> offload experts",
                f"cache: {cache_why} experts per layer ({sum(slots)} slots, {format_bytes(sum(slots) * slot)}) after "
                f"{format_bytes(held)} dense + runtime + KV and the engine's headroom",
                f"{loads:.1f} expert loads per token ({loads_why})", prefetch_why,
                f"each load: {load_why}",
                f"decode: {w_why} + {f_why} + {loads * load_s * 1e3:.0f} ms loading -> {1 / step:.2f} tokens/s"]
    return Plan(model_name, device.name, "offload", wtype, bits, budget, context, threads,
                slots, prefetch, int(peak), 1 / step, tuple(reasons), loads, load_s)


def _ort_predict(spec: ModelSpec, device: HardwareProfile, context: int) -> tuple[int, float | None, list[str]]:
    """(bytes ONNX Runtime holds, its predicted decode tokens/s or None, the reasons) for an int4
    ONNX bundle on the CPU provider: weights at ORT's measured streaming rate (else the device's ggml
    GEMV rate, stated) plus its fixed cost per layer measured on the embedded model."""
    whole_w, active = ort_bytes(spec)
    kv32 = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * context * 4  # float32 K and V
    held = int(whole_w + kv32 + LLAMA_OVERHEAD_BYTES)
    reasons = [f"ONNX Runtime holds {format_bytes(held)} (int4 weights {format_bytes(whole_w)}, float32 KV for "
               f"{context} tokens {format_bytes(kv32)}, runtime {format_bytes(LLAMA_OVERHEAD_BYTES)})"]
    if device.ort_layer_us is None:
        reasons.append("ONNX Runtime's speed is not measured on this device (edge device profile measures its CPU "
                       "provider; a device file's other providers are not measured)")
        return held, None, reasons
    stream, why = stream_bytes_per_s(device, "llamacpp")
    if device.ort_stream_ratio and stream:
        stream *= device.ort_stream_ratio
        why = (f"{device.ort_stream_ratio:.2f} x llama.cpp's rate ({why}): ONNX Runtime's measured bytes per second "
               f"against llama.cpp's on the same MoE probe = {stream / 1e9:.1f} GB/s")
    elif stream:
        why = f"llama.cpp's rate ({why}): ONNX Runtime's relative rate not measured"
    reasons.append(f"ONNX Runtime weights stream at {why}")
    w_s, w_why = weights_s(active, whole_w, stream, device, True) if stream else (0.0, "weights: unknown rate")
    f_s, f_why = fixed_s(device.ort_layer_us, spec.n_layers, "ONNX Runtime")
    decode = 1 / (w_s + f_s) if w_s + f_s > 0 else None
    reasons.append(f"ONNX Runtime decode: {w_why} + {f_why} -> {decode:.1f} tokens/s" if decode else
                   "ONNX Runtime decode: not predicted")
    return held, decode, reasons


def _ort_plan(spec: ModelSpec, device: HardwareProfile, budget: int, context: int, model_name: str,
              threads: int) -> Plan:
    """The ONNX Runtime plan, asked for: refused with the numbers when it does not fit."""
    held, decode, reasons = _ort_predict(spec, device, context)
    if held > budget:
        raise EdgeError(f"needs {format_bytes(held)} to run whole on ONNX Runtime at int4; budget is "
                        f"{format_bytes(budget)} (use the offload backend)")
    reasons.append(f"fits: {format_bytes(held)} <= budget {format_bytes(budget)}; ONNX Runtime asked for")
    return Plan(model_name, device.name, "ort", "int4", 4, budget, context, threads, None, 0, held, decode,
                tuple(reasons))


def _ort_instead(spec: ModelSpec, device: HardwareProfile, budget: int, context: int, model_name: str, threads: int,
                 llama_decode: float) -> Plan | str:
    """The ONNX Runtime plan where it is predicted at least ORT_MARGIN x llama.cpp's ``llama_decode``,
    else the reason line saying why the plan stays llama.cpp's."""
    held, decode, reasons = _ort_predict(spec, device, context)
    if decode is None:
        return f"not ONNX Runtime: {reasons[-1]}"
    if held > budget:
        return f"not ONNX Runtime: it would hold {format_bytes(held)} > budget {format_bytes(budget)}"
    if decode < ORT_MARGIN * llama_decode:
        return (f"not ONNX Runtime: predicted {decode:.1f} tokens/s ({reasons[-1].split(': ', 1)[1]}) against "
                f"llama.cpp's {llama_decode:.1f}; it runs a model only where predicted at least {ORT_MARGIN}x "
                f"faster (it holds more memory, and the fixed costs behind both predictions vary by ~10% run to "
                f"run here)")
    reasons.append(f"ONNX Runtime predicted {decode:.1f} tokens/s against llama.cpp's {llama_decode:.1f} "
                   f"({decode / llama_decode:.2f}x, at least {ORT_MARGIN}x): ONNX Runtime runs it")
    return Plan(model_name, device.name, "ort", "int4", 4, budget, context, threads, None, 0, held, decode,
                tuple(reasons))


def _gguf_offload(spec: ModelSpec, device: HardwareProfile, stored: StoredExperts, budget: int, context: int,
                  kv32: int, locality: dict, model_name: str, whole: float, threads: int) -> Plan:
    """An offload plan for a GGUF read straight from the file: its trunk resident in its own types,
    experts read (aligned spans, no conversion) into slots of their file size, cache sized by the
    engine's own functions; prefetch planned off (no replay of its guesses exists for a GGUF).
    ``kv32``: the engine's f32 KV cache for the context."""
    L, E, K = spec.n_layers, spec.n_experts, spec.top_k
    held = stored.trunk_bytes + kv32 + scratch_bytes(spec) + OFFLOAD_RUNTIME_BYTES
    room = cache_room(budget, held)
    smallest = K * sum(stored.slot_bytes)
    types = stored.types
    if room < smallest:
        raise EdgeError(f"needs {format_bytes(held + smallest + headroom_bytes(budget))} with offloading from the GGUF "
                        f"({format_bytes(stored.trunk_bytes)} trunk, KV {format_bytes(kv32)}, {L} layers x {K} experts "
                        f"in {types}); budget is {format_bytes(budget)}")
    read_mbps = device.storage_chunk_read_mbps or device.storage_seq_read_mbps
    if not read_mbps:
        raise EdgeError(f"device '{device.name}' has no storage read speed to plan offloading with")
    slots = slots_within(room, list(stored.slot_bytes), E, K, locality.get("sch"))
    reply = locality.get("reply")
    if reply:
        loads = _at_slots(reply["layer_demand_loads_per_token"], slots, locality.get("sizes"))
        loads_why = (f"the engine's cache policy, prefetcher off, replayed on the routing recorded in use, per layer, "
                     f"over {reply['reply_tokens']}-token replies after {reply['prompt_tokens']}-token prompts")
    else:
        loads, loads_why = _loads_per_token(locality, slots, L, E, K)
    load_s, load_why = stored_load_s(stored, device, read_mbps)
    cache = sum(c * b for c, b in zip(slots, stored.slot_bytes))
    peak = held + cache + MARGIN_BYTES
    reasons = [f"does not fit whole: {format_bytes(whole)} > budget {format_bytes(budget)} -> offload experts, read "
               f"straight from the GGUF in {types}",
               f"cache: {slots_text(slots)} of {E} experts per layer ({sum(slots)} slots, {format_bytes(cache)}) after "
               f"{format_bytes(held)} trunk + runtime + KV and the engine's headroom",
               f"{loads:.1f} expert loads per token ({loads_why})",
               "prefetch off: no replay of its guesses exists for a GGUF, and it only pays where CPUs are spare",
               f"each load: {load_why}"]
    if device.gguf_step_compute_s:  # measured: the engine on this file, every expert already in the cache
        compute_s = device.gguf_step_compute_s
        compute_why = f"{compute_s * 1e3:.0f} ms computing (the engine measured on this file, no loads)"
    else:
        weights, weights_why = stored_compute_s(stored, spec, device)
        if weights is None:
            reasons.append(f"speed unknown: {weights_why}")
            return Plan(model_name, device.name, "offload", f"gguf:{types}", 4, budget, context, threads, slots, 0,
                        int(peak), None, tuple(reasons), loads, load_s)
        f_s, f_why = fixed_s(device.offload_layer_us, L, "the offload engine")
        compute_s, compute_why = weights + f_s, f"weights {weights_why} + {f_why}"
    step = compute_s + loads * load_s
    reasons.append(f"decode: {compute_why} + {loads * load_s * 1e3:.0f} ms loading -> {1 / step:.2f} tokens/s")
    return Plan(model_name, device.name, "offload", f"gguf:{types}", 4, budget, context, threads, slots, 0, int(peak),
                1 / step, tuple(reasons), loads, load_s)


def slots_text(slots: tuple[int, ...] | None) -> str:
    """'3' for a uniform cache, '2-3' when layers differ."""
    if not slots:
        return "-"
    return str(slots[0]) if min(slots) == max(slots) else f"{min(slots)}-{max(slots)}"


def _at(row: list[float | None], c: int, sizes: list[int] | None) -> float:
    """One layer's figure at ``c`` slots: ``row[c - 1]`` (older bundles: one entry per size 1..E), or
    interpolated linearly between the measured ``sizes``."""
    if sizes is None:
        return row[c - 1]
    return float(np.interp(c, sizes, row))


def _at_slots(per_layer: list[list[float | None]], slots: tuple[int, ...], sizes: list[int] | None = None) -> float:
    """Loads per token summed over the layers, each layer's figure read at its own cache size."""
    return sum(_at(row, c, sizes) for row, c in zip(per_layer, slots))


def _loads_per_token(locality: dict, slots: tuple[int, ...], L: int, E: int, K: int) -> tuple[float, str]:
    sizes = locality.get("sizes")
    reply = locality.get("reply")
    if reply:  # what edge bench measures: a short reply from a freshly loaded engine
        loads = _at_slots(reply["layer_loads_per_token"], slots, sizes)
        steady = locality.get("layer_loads_per_token")
        steady_text = (f"; {_at_slots(steady, slots, sizes):.1f} per token in steady use"
                       if steady else "")
        return loads, (f"the engine's cache policy and prefetcher replayed on the model's calibration trace, per "
                       f"layer, over {reply['reply_tokens']}-token replies after {reply['prompt_tokens']}-token "
                       f"prompts from an empty cache{steady_text}")
    per_layer = locality.get("layer_loads_per_token")
    if per_layer:
        return (_at_slots(per_layer, slots, sizes),
                "the engine's cache policy and prefetcher replayed on the model's calibration trace, per layer")
    c = sum(slots) // L  # older bundles: one figure per uniform cache size
    replayed = locality.get("loads_per_token")
    if replayed and (sizes or replayed[c - 1] is not None):
        return _at(replayed, c, sizes), f"the engine replayed on the model's calibration trace at {c} slots per layer"
    hits = locality.get("policy_hit")
    if hits:
        hit = _at(hits, c, sizes)
        return L * K * (1 - hit), f"hit rate {hit:.2f} of the cache policy on the model's trace"
    return L * K * (1 - c / E), f"hit rate {c / E:.2f}: uniform routing assumed, no trace"


