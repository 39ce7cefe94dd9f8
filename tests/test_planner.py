"""The planner's decisions on real model specs and device profiles (pure function, no I/O)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import edge
from edge.device.profiles import device_names, device_profile, load_device_file
from edge.errors import EdgeError
from edge.hardware import HardwareProfile
from edge.plan.planner import plan

THIS = HardwareProfile(
    name="test box", source="measured", measured_unix=0, cpu_model="x", cores_physical=2, cores_logical=2,
    isa=("avx2",), ram_total_bytes=8 << 30, ram_available_bytes=6 << 30, cgroup_limit_bytes=None,
    memory_bandwidth_gbps=20.0, storage_seq_read_mbps=1000, storage_buffered_read_mbps=2000,
    storage_rand_read_mbps=50, storage_chunk_read_mbps=1200, storage_chunk_latency_ms=0.5, storage_path="/tmp", gemv_q4_gflops=60.0,
    gemv_q8_gflops=60.0, ggml_call_us=20.0, convert_mbps=2000, llama_layer_us=60.0, offload_layer_us=300.0,
    gpu=None, ort_providers=("CPUExecutionProvider",), llama_rpc=True)


@pytest.fixture(scope="module")
def big():
    """A Mixtral-shaped spec far larger than small budgets: 16 layers x 16 experts."""
    spec = edge.inspect()
    return replace(spec, n_layers=16, hidden_size=1024, n_experts=16, expert_ffn_size=2816,
                   expert_params=16 * 16 * 3 * 1024 * 2816, dense_params=50_000_000)


def test_a_model_that_fits_runs_whole_on_llama_cpp():
    p = plan(edge.inspect(), THIS, context=2048)
    assert p.backend == "llamacpp" and p.cache_slots_per_layer is None
    assert p.predicted_peak_bytes < 100 << 20 and p.predicted_decode_tok_s > 100
    assert any("fits" in r for r in p.reasons)


def test_a_cache_resident_model_costs_its_measured_fixed_cost_only(big):
    spec = edge.inspect()  # 4.4 M parameters: a few MB at 4 bits
    cached = replace(THIS, llc_bytes=32 << 20)
    p = plan(spec, cached, context=512)
    assert p.predicted_decode_tok_s == pytest.approx(1e6 / (spec.n_layers * THIS.llama_layer_us))
    assert any("last-level cache" in r for r in p.reasons)
    # without a known cache, or for a model larger than it, the weights stream from DRAM on top
    assert plan(spec, THIS, context=512).predicted_decode_tok_s < p.predicted_decode_tok_s
    off = plan(big, cached, budget_bytes=600 << 20, context=512)
    assert not any("last-level cache" in r for r in off.reasons)


def test_a_2_bit_plan_uses_the_2_bit_conversion_rate(big):
    fast = replace(THIS, convert_2bit_mbps=4 * THIS.convert_mbps)
    two, two_fast = (plan(big, d, budget_bytes=600 << 20, context=512, bits=2) for d in (THIS, fast))
    assert two_fast.predicted_load_s < two.predicted_load_s
    assert any(f"conversion at {4 * THIS.convert_mbps:.0f} MB/s" in r for r in two_fast.reasons)
    four = plan(big, fast, budget_bytes=600 << 20, context=512, bits=4)  # 4-bit loads: the 4-bit rate
    assert any(f"conversion at {THIS.convert_mbps:.0f} MB/s" in r for r in four.reasons)


def test_llama_cpp_plans_use_llama_cpps_measured_streaming_rate():
    spec = edge.inspect()
    big_dense = replace(spec, dense_params=400_000_000)  # far beyond any cache: the streaming term counts
    gemv = plan(big_dense, THIS, context=512)
    measured = plan(big_dense, replace(THIS, llama_stream_gbps=3 * THIS.gemv_q4_gflops / 2 * 5 / 8), context=512)
    assert measured.predicted_decode_tok_s > gemv.predicted_decode_tok_s
    assert any("measured llama.cpp MoE decode" in r for r in measured.reasons)


def test_expert_loads_carry_the_engines_measured_load_factor(big):
    alone = plan(big, THIS, budget_bytes=600 << 20, context=512)
    shared = plan(big, replace(THIS, engine_load_factor=1.5), budget_bytes=600 << 20, context=512)
    assert shared.predicted_load_s == pytest.approx(1.5 * alone.predicted_load_s)
    assert shared.predicted_decode_tok_s < alone.predicted_decode_tok_s
    assert any("x 1.50 measured in the engine" in r for r in shared.reasons)
    both = replace(THIS, engine_load_factor=1.5, engine_load_factor_2bit=1.2)  # 2-bit loads: their own factor
    two, two_alone = (plan(big, d, budget_bytes=600 << 20, context=512, bits=2) for d in (both, THIS))
    assert two.predicted_load_s == pytest.approx(1.2 * two_alone.predicted_load_s)


def test_a_model_that_does_not_fit_is_offloaded_within_the_budget(big):
    p = plan(big, THIS, budget_bytes=600 << 20, context=512)
    assert p.backend == "offload"
    assert min(p.cache_slots_per_layer) >= 2 and 2 * 16 < sum(p.cache_slots_per_layer) < 16 * 16
    assert p.predicted_peak_bytes <= 600 << 20
    more = plan(big, THIS, budget_bytes=900 << 20, context=512)
    assert sum(more.cache_slots_per_layer) > sum(p.cache_slots_per_layer)
    assert more.predicted_decode_tok_s > p.predicted_decode_tok_s  # a bigger cache loads less


def test_prefetching_is_planned_only_where_it_saves_loads(big):
    def locality(with_prefetch: float, without: float) -> dict:
        row = lambda v: [None] + [v] * 15  # noqa: E731  (per layer, for 2..16 slots)
        return {"reply": {"prompt_tokens": 24, "reply_tokens": 64, "layer_loads_per_token": [row(with_prefetch)] * 16,
                          "layer_demand_loads_per_token": [row(without)] * 16}}

    wrong_guesses = plan(big, THIS, budget_bytes=600 << 20, context=512, locality=locality(1.8, 1.4))
    assert wrong_guesses.prefetch_layers == 0
    assert wrong_guesses.predicted_loads_per_token == pytest.approx(16 * 1.4)
    assert any(r.startswith("prefetch off") for r in wrong_guesses.reasons)
    saves = plan(big, THIS, budget_bytes=600 << 20, context=512, locality=locality(1.2, 1.4))
    assert saves.prefetch_layers == 1 and saves.predicted_loads_per_token == pytest.approx(16 * 1.2)


def test_locality_raises_the_predicted_speed(big):
    uniform = plan(big, THIS, budget_bytes=600 << 20, context=512)
    local = plan(big, THIS, budget_bytes=600 << 20, context=512, locality={"policy_hit": [0.3, 0.55, 0.7, 0.8] + [0.9] * 12})
    assert local.predicted_decode_tok_s > uniform.predicted_decode_tok_s


def test_impossible_budget_is_refused_with_numbers(big):
    with pytest.raises(EdgeError, match=r"needs .* at 4 bits with offloading .* budget is 95.4 MiB"):
        plan(big, THIS, budget_bytes=100_000_000, context=512)


def test_every_device_profile_validates_and_plans():
    names = device_names()
    assert len(names) >= 8
    for name in names:
        dev = device_profile(name)
        assert dev.ram_total_bytes > 0
        assert dev.ort_providers[0] == "CPUExecutionProvider"  # each file lists its providers, CPU first
        p = plan(edge.inspect(), dev, context=2048)
        assert p.backend == "llamacpp" and p.predicted_peak_bytes < dev.ram_total_bytes
        if dev.memory_bandwidth_gbps:
            assert p.predicted_decode_tok_s > 0
        else:  # no published bandwidth: the plan says so instead of guessing a speed
            assert p.predicted_decode_tok_s is None and any("unknown" in r for r in p.reasons)


def test_malformed_profile_names_the_field(tmp_path):
    from edge.device.profiles import profiles_dir

    src = (profiles_dir() / f"{device_names()[0]}.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("ram_bytes:", "ram_bytes_typo:"))
    with pytest.raises(EdgeError, match=r"bad.yaml: field '(ram_bytes|ram_bytes_typo)"):
        load_device_file(bad)
    bad.write_text("name: [unclosed")
    with pytest.raises(EdgeError, match="bad.yaml: not valid YAML"):
        load_device_file(bad)
    bad.write_text(src.replace("execution_providers: {value: [cpu", "execution_providers: {value: [tpu"))
    with pytest.raises(EdgeError, match=r"bad.yaml: field 'execution_providers'.*cpu, xnnpack, qnn, coreml, openvino"):
        load_device_file(bad)


def test_a_gguf_read_from_the_file_is_planned_in_its_own_types(tmp_path):
    """An offload plan for a GGUF prices its experts' aligned spans (no conversion), its products
    at each type's measured rate, and sizes the cache with the engine's own per-layer slot bytes."""
    from edge.formats.gguf_read import open_reader, read_spec, stored_experts

    edge.build(None, tmp_path / "g", format="gguf", weight_type="q4_k_m")
    path = tmp_path / "g" / "model.gguf"
    reader = open_reader(path)
    spec = read_spec(path, reader)
    stored = stored_experts(reader, spec)
    assert stored.types == "Q4_K/Q5_0/Q6_K" and stored.reads_per_load == 3
    assert all(r % 4096 == 0 for r in stored.slot_bytes)  # whole aligned spans
    fast = replace(THIS, gemv_types=(("Q4_K", 60.0), ("Q5_0", 60.0), ("Q6_K", 60.0), ("Q8_0", 60.0)))
    slow = replace(THIS, gemv_types=(("Q4_K", 20.0), ("Q5_0", 20.0), ("Q6_K", 20.0), ("Q8_0", 20.0)))
    budget = 400 << 20
    a = plan(spec, fast, budget_bytes=budget, context=512, backend="offload", stored=stored)
    b = plan(spec, slow, budget_bytes=budget, context=512, backend="offload", stored=stored)
    assert a.backend == "offload" and a.weight_type == "gguf:Q4_K/Q5_0/Q6_K" and a.prefetch_layers == 0
    assert a.predicted_decode_tok_s > b.predicted_decode_tok_s  # the measured per-type rates count
    assert any("no checksum, no conversion" in r for r in a.reasons)
    assert a.predicted_peak_bytes <= budget and min(a.cache_slots_per_layer) >= spec.top_k
    with pytest.raises(EdgeError, match=r"needs .* with offloading from the GGUF .* budget is 10 MiB"):
        plan(spec, fast, budget_bytes=10 << 20, context=512, backend="offload", stored=stored)


def test_onnx_runtime_is_chosen_only_where_predicted_faster():
    """ONNX Runtime is the third candidate: with its measured fixed cost below llama.cpp's the plan
    is ORT's and says why; above, llama.cpp's plan names ORT's slower prediction; unmeasured (a
    device file), llama.cpp runs it and the reason says ORT was not measured."""
    spec = edge.inspect()
    cached = replace(THIS, llc_bytes=32 << 20)
    faster = plan(spec, replace(cached, ort_layer_us=40.0), context=512)
    assert faster.backend == "ort" and faster.weight_type == "int4"
    assert faster.predicted_decode_tok_s == pytest.approx(1e6 / (spec.n_layers * 40.0))
    assert any("against llama.cpp's" in r for r in faster.reasons)
    slower = plan(spec, replace(cached, ort_layer_us=90.0), context=512)
    assert slower.backend == "llamacpp"
    assert any(r.startswith("not ONNX Runtime: predicted") for r in slower.reasons)
    unmeasured = plan(spec, cached, context=512)
    assert unmeasured.backend == "llamacpp" and any("not measured" in r for r in unmeasured.reasons)
    asked = plan(spec, cached, context=512, backend="ort")
    assert asked.backend == "ort" and asked.predicted_decode_tok_s is None
    with pytest.raises(EdgeError, match=r"needs .* on ONNX Runtime at int4; budget is"):
        plan(spec, cached, context=512, backend="ort", budget_bytes=10 << 20)
