"""The cost formulas of a decode step, shared by the planner and the profiler's probes (which measure
a device by inverting them). Pure: numbers in, numbers out, each with the words that explain it.
"""

from __future__ import annotations

from edge.hardware import HardwareProfile
from edge.quant.nested import NestedLayout
from edge.quant.store import read_bytes
from edge.spec import ModelSpec
from edge.units import format_bytes

# Bits per weight of the formats the plan can pick (ggml block layouts: scale/offset included).
BPW = {"q4_1": 5.0, "q8_0": 8.5, "f16": 16.0}
LLAMA_OVERHEAD_BYTES = 64 << 20  # llama.cpp compute buffers and runtime (measured ~60 MB, docs/offload.md)
# Python, numpy, ggml and llama.cpp's libraries and edge's modules, beside the trunk, KV cache,
# graph scratch and staging buffers the planner counts apart: 61 MiB measured in a fresh process
# running the tiny synthetic bundle (109 MiB held before its cache, less 2 trunk, 42 scratch, 1 KV,
# 2 staging), and the CLI's own modules on top
OFFLOAD_RUNTIME_BYTES = 96 << 20
# ONNX bundles at int4 (edge/builder/onnx_graph.py): 4-bit codes, a float32 scale and a 4-bit zero point
# per 32 weights; the embedding and output matrix at 8 bits (8-bit codes, scale and zero point per 32).
ORT_INT4_BPW = 4 + (32 + 4) / 32
ORT_HEAD_BPW = 8 + (32 + 8) / 32
GEMV_SHARE_OF_PEAK = 0.70  # device profiles list peak DRAM bandwidth, not a measured GEMV rate
CRC_BYTES_PER_S = 4e9  # zlib.crc32 when a profile has no measured checksum speed (2-4 GB/s here)


def slot_bytes(spec: ModelSpec) -> int:
    """Bytes of one expert cache slot: the expert's matrices as ggml Q4_1 (5 bits per weight)."""
    return int(spec.expert_params // (spec.n_layers * spec.n_experts) * BPW["q4_1"] / 8)


def staging_bytes(spec: ModelSpec, threads: int = 1) -> int:
    """The nested store's staging per loading thread: one 4-bit read and its conversion scratch."""
    F, D = spec.expert_ffn_size, spec.hidden_size
    return threads * (expert_read_bytes(spec, 4) + 3 * F * D)


def expert_read_bytes(spec: ModelSpec, bits: int) -> int:
    """Bytes one ``bits``-bit expert load reads from the store: the record's header (fp16 scale and
    offset per 64 weights, 0.5 bit per weight) and ``bits`` bit planes, in whole 4 KiB blocks
    (edge/quant/store.py, the reader's own rule)."""
    F, D = spec.expert_ffn_size, spec.hidden_size
    return read_bytes(NestedLayout(((F, D), (F, D), (D, F))), bits)


def gemv_stream_bps(gemv_q4_gflops: float) -> float:
    """Bytes of Q4_1 weights per second a ggml matrix-vector product streams (2 flops per weight)."""
    return gemv_q4_gflops * 1e9 / 2 * BPW["q4_1"] / 8


def stream_bytes_per_s(device: HardwareProfile, backend: str) -> tuple[float | None, str]:
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


def expert_load_s(spec: ModelSpec, device: HardwareProfile, bits: int, read_mbps: float) -> tuple[float, str]:
    """Seconds one expert load costs the offload engine: its b-bit prefix read at ``read_mbps`` plus
    latency, checksummed, converted into a Q4_1 slot, all as measured on this device (on the
    bundle's own store when planned for one), times how much dearer the engine's loads measured on
    that bundle than those steps timed alone (device.probes.measure_engine_load_factors)."""
    slot = slot_bytes(spec)
    nbytes = expert_read_bytes(spec, bits)
    # a 2-bit prefix has half the bit planes to unpack: 3.1 vs 3.8-4.0 ms per synthetic expert here
    convert_mbps = device.convert_2bit_mbps if bits == 2 and device.convert_2bit_mbps else device.convert_mbps
    convert_s = slot / (convert_mbps * 1e6) if convert_mbps else 0.0
    latency_s = (device.storage_chunk_latency_ms or 0.0) / 1e3
    crc_s = nbytes / (device.checksum_mbps * 1e6 if device.checksum_mbps else CRC_BYTES_PER_S)
    parts = latency_s + nbytes / (read_mbps * 1e6) + crc_s + convert_s
    measured = device.engine_load_factor_2bit if bits == 2 and device.engine_load_factor_2bit else \
        device.engine_load_factor
    factor = measured or 1.0
    why = (f"{format_bytes(nbytes)} at {read_mbps:.0f} MB/s + {latency_s * 1e3:.1f} ms latency"
           + (f" + checksum at {device.checksum_mbps:.0f} MB/s" if device.checksum_mbps else " + checksum")
           + (f" + conversion at {convert_mbps:.0f} MB/s" if convert_mbps else "") + f" = {parts * 1e3:.1f} ms"
           + (f", x {factor:.2f} measured in the engine on this bundle (its loads vs the steps timed alone) "
              f"= {parts * factor * 1e3:.1f} ms" if measured else ""))
    return parts * factor, why


def offload_compute_s(spec: ModelSpec, device: HardwareProfile, slots: tuple[int, ...],
                      stream: float) -> tuple[float, str, float, str]:
    """(weights seconds, why, fixed seconds, why) of one offload decode step, loads aside: dense
    weights at Q8_0 and K experts at Q4_1 streamed, plus the engine's fixed cost per layer."""
    active = spec.decode_bytes(BPW["q8_0"], BPW["q4_1"])
    w_s, w_why = weights_s(active, spec.dense_params * BPW["q8_0"] / 8 + sum(slots) * slot_bytes(spec), stream, device,
                           device.offload_layer_us is not None)
    f_s, f_why = fixed_s(device.offload_layer_us, spec.n_layers, "the offload engine")
    return w_s, w_why, f_s, f_why


def weights_s(active: float, resident: float, stream: float, device: HardwareProfile,
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


def fixed_s(per_layer_us: float | None, n_layers: int, who: str) -> tuple[float, str]:
    if per_layer_us is None:
        return 0.0, f"{who}'s fixed cost per layer (not measured on this device: left out, so speed is an upper bound)"
    return n_layers * per_layer_us * 1e-6, f"{n_layers} x {per_layer_us:.0f} µs fixed cost per layer ({who}, measured)"


def type_stream_bps(device: HardwareProfile, type_name: str) -> tuple[float | None, str]:
    """Bytes per second a ggml GEMV streams of weights in ``type_name`` on this device: its measured
    rate where the profile has one, else the Q4_1 rate in bytes (stated), else the DRAM estimate."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    bpw = size * 8 / block
    rates = dict(device.gemv_types)
    if type_name in rates:
        return rates[type_name] * 1e9 / 2 * bpw / 8, f"{type_name} {rates[type_name]:.0f} GFLOP/s"
    if type_name in ("F32", "F16", "BF16") and device.memory_bandwidth_gbps:  # numpy/ggml float products: DRAM-bound
        return device.memory_bandwidth_gbps * 1e9 / 2, f"{type_name} at half the copy bandwidth"
    bps, why = stream_bytes_per_s(device, "offload")
    return bps, f"{type_name} not measured: as Q4_1 ({why})"


def stored_compute_s(stored, spec: ModelSpec, device: HardwareProfile) -> tuple[float | None, str]:
    """Seconds a decoded token spends in products over weights stored in their file types: the
    streamed trunk and K experts per layer, each type at its own measured rate."""
    total, parts = 0.0, {}
    terms = list(stored.trunk_streamed) + [(t, spec.top_k * n) for layer in stored.expert_types for t, n in layer]
    for t, n in terms:
        bps, why = type_stream_bps(device, t)
        if bps is None:
            return None, why
        total += n / bps
        parts[t] = parts.get(t, 0) + n
        parts[t + " why"] = why
    text = ", ".join(f"{format_bytes(parts[t])} {parts[t + ' why']}" for t in sorted(k for k in parts if " why" not in k))
    return total, f"{text} -> {total * 1e3:.0f} ms"


def stored_load_s(stored, device: HardwareProfile, read_mbps: float) -> tuple[float, str]:
    """Seconds one expert load costs when it is read in its file type: its aligned spans (one read
    per matrix) at the scattered-read speed plus each read's latency; nothing to check or convert."""
    nbytes = sum(stored.read_bytes) / len(stored.read_bytes)
    latency = (device.storage_chunk_latency_ms or 0.0) / 1e3 * stored.reads_per_load
    s = latency + nbytes / (read_mbps * 1e6)
    return s, (f"{format_bytes(nbytes)} in {stored.reads_per_load} reads at {read_mbps:.0f} MB/s + "
               f"{latency * 1e3:.1f} ms latency = {s * 1e3:.1f} ms (no checksum, no conversion)")


def ort_bytes(spec: ModelSpec) -> tuple[float, float]:
    """(bytes of an int4 ONNX bundle's weights, bytes one decoded token reads of them): the output
    matrix and embedding at 8 bits, every other matrix (and K of E experts per token) at 4."""
    head = spec.vocab_size * spec.hidden_size  # the output matrix; the embedding too unless tied
    tables = head if spec.tied_embeddings else 2 * head
    whole = ((spec.dense_params - tables) * ORT_INT4_BPW + tables * ORT_HEAD_BPW
             + spec.expert_params * ORT_INT4_BPW) / 8
    active = ((spec.dense_streamed_params - head) * ORT_INT4_BPW + head * ORT_HEAD_BPW
              + spec.expert_params * spec.top_k / spec.n_experts * ORT_INT4_BPW) / 8
    return whole, active
