"""The offload engine on the default model: correctness, budgets, corruption, telemetry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge
from helpers import offload_and_reference_perplexity
from edge.errors import BundleError
from edge.moe.policies import DEFAULT_POLICY, POLICIES
from edge.sdk import OffloadOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("off") / "bundle"
    edge.build(None, out, format="offload")
    return out


def _greedy(model, prompt: str, n: int) -> list[int]:
    be = model.backend
    be.truncate(0)
    logits = be.eval(model.tokenize(prompt))
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = be.eval([out[-1]])
    return out


def test_offload_bundle_layout(bundle):
    from edge.formats.bundle import read_manifest

    m = read_manifest(bundle)
    assert m.format == "offload"
    assert {f.role for f in m.files} == {"weights", "experts", "tokenizer"}
    assert len(m.experts["crc32"]) == 4 * 8 and len(m.experts["crc32"][0]) == 7  # sections for 2..8 bits
    assert m.experts["stride"] % 4096 == 0
    assert len(m.locality["sch"]) == 4 and len(m.locality["sch"][0]) == 8


def test_offload_engine_computes_the_model(bundle, default_dir):
    """4-bit experts and Q8_0 dense weights: perplexity within 3% of the f32 reference."""
    ours, ref = offload_and_reference_perplexity(bundle, default_dir)
    assert abs(ours / ref - 1) < 0.03, (ours, ref)


def test_small_cache_gives_the_same_tokens_as_a_full_one(bundle):
    opts = OffloadOptions(pin_bits=True)
    with edge.load(bundle, offload=opts) as full:
        want = _greedy(full, "def fibonacci(", 40)
        assert full.metrics()["cache_slots_per_layer"] == [8, 8, 8, 8]
    with edge.load(bundle, offload=opts) as small:
        small.backend.set_cache((2, 2, 2, 2), small.backend.config.bits)
        got = _greedy(small, "def fibonacci(", 40)
        met = small.metrics()
    assert got == want
    assert met["cache_misses"] > 0 and met["bytes_read"] > 0
    assert met["bits_histogram"] == {4: met["cache_hits"] + met["cache_misses"]}


def test_prefetch_and_policies_are_counted(bundle):
    for policy in POLICIES:
        with edge.load(bundle, offload=OffloadOptions(policy=policy, prefetch=True)) as m:
            m.backend.set_cache((3, 3, 3, 3), m.backend.config.bits)
            m.create_completion("import os\nimport sys\n", max_tokens=30, temperature=0)
            met = m.metrics()
        assert met["policy"] == policy
        assert sum(x["prefetch_hits"] for x in met["per_layer"]) > 0
        assert 0 < met["hit_rate"] < 1
        assert met["decode_tokens_per_s"] > 0 and met["time_to_first_token_s"] > 0


def test_hebf_serves_cold_experts_at_fewer_bits(bundle):
    with edge.load(bundle) as m:
        bits = m.backend.config.bits
        m.backend.set_cache((3, 3, 3, 3), bits)
        m.create_completion("class Queue:\n", max_tokens=30, temperature=0)
        hist = m.metrics()["bits_histogram"]
    assert bits.max() == 4 and bits.min() == 2
    assert set(hist) > {4} and hist[4] > 0


def test_impossible_budget_is_refused_with_numbers(bundle):
    with pytest.raises(edge.EdgeError, match=r"memory budget .* too small: .* take .* need"):
        edge.load(bundle, memory_budget="10MB")


def test_corrupted_expert_record_is_refused_by_layer_and_expert(tmp_path, bundle):
    from edge.formats.bundle import read_manifest
    from edge.quant.store import StoreIndex

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    index = StoreIndex.from_dict(read_manifest(b).experts)
    path = b / "experts.bin"
    data = bytearray(path.read_bytes())
    data[index.offset(2, 5) + index.layout.header_bytes + 10] ^= 0x40  # inside the top-bits section
    path.write_bytes(data)
    from edge.data.corpus import stdlib_corpus

    prompt = stdlib_corpus().heldout_texts()[4][:3000]  # long enough to route through every expert
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "run", prompt, "-m", str(b), "-n", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: expert record for layer 2 expert 5 is corrupted (checksum mismatch "
                                   "in section 0 of experts.bin); refusing to use it")
    with edge.load(b) as m, pytest.raises(BundleError, match="layer 2 expert 5 is corrupted"):
        m.create_completion(prompt, max_tokens=4)
    with pytest.raises(BundleError, match="experts.bin fails its SHA-256 check"):
        edge.load(b, verify=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup memory limits need root")
def test_runs_inside_a_cgroup_cap_equal_to_its_budget(bundle):
    sys.path.insert(0, str(ROOT / "bench"))
    from cgroup import MemoryCap

    budget = 160 << 20
    args = ["run", "def fibonacci(", "-m", str(bundle), "-n", "32", "-t", "0", "--pin-bits", "--no-stream"]
    plain = subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    with MemoryCap(budget) as cap:
        capped = cap.run([sys.executable, "-m", "edge.cli", *args, "--memory-budget", str(budget)],
                         capture_output=True, text=True, timeout=300)
        assert cap.oom_kills == 0
        assert cap.peak_bytes <= budget
    assert capped.returncode == 0, capped.stderr
    assert capped.stdout == plain.stdout


def test_reply_replay_predicts_the_engines_loads(bundle, default_dir):
    """The planner's loads per reply token come from replaying the engine's cache on the reference
    engine's routing of calibration text; the engine itself, fed the same text (a 24-token prompt,
    then 64 tokens one at a time), loads as many experts within 15%."""
    from edge.builder.offload import REPLY, calibration_tokens, routing_and_guesses
    from edge.formats.hf import load_weights
    from edge.moe.simulate import simulate_replies
    from edge.runtime.tokenizer import HFTokenizer

    prompt, reply = REPLY
    weights = load_weights(default_dir)
    tokens = calibration_tokens(HFTokenizer(default_dir / "tokenizer.json"))[: prompt + reply]
    trace, guesses = routing_and_guesses(weights, tokens)
    s = weights.spec
    for c in (3, 5):
        replayed = sum(simulate_replies(trace.layer(i), guesses[i], s.n_experts, c, DEFAULT_POLICY, prompt, reply)
                       for i in range(s.n_layers)) * reply
        with edge.load(bundle, offload=OffloadOptions(pin_bits=True, prefetch=True)) as m:  # as replayed
            be = m.backend
            be.set_cache([c] * s.n_layers, np.full((s.n_layers, s.n_experts), 4))
            be.eval(tokens[:prompt])
            before = m.metrics()
            for t in tokens[prompt:]:
                be.eval([t])
            after = m.metrics()
        done = after["expert_loads"] - before["expert_loads"]
        assert replayed > 20  # enough loads for the comparison to mean something
        assert done == pytest.approx(replayed, rel=0.15), (c, done, replayed)


def test_bundle_probe_measures_the_engines_load_costs(tiny_synthetic, tmp_path):
    """at_bundle times read, checksum and conversion on the bundle's own store and then the engine
    decoding it with the smallest cache: a real factor, used by the plan's load cost. (The tiny
    synthetic model's 1 MiB experts: the default model's 60 KiB loads are too small a share of a
    step to time apart reliably.)"""
    from edge.device.profile import at_bundle, cached_profile
    from edge.formats.bundle import read_manifest
    from edge.plan.planner import plan

    bundle = tmp_path / "synthetic-offload"
    edge.build(tiny_synthetic, bundle, format="offload")
    base = cached_profile()
    dev = at_bundle(base, bundle)
    if dev.storage_path == base.storage_path:
        pytest.skip("O_DIRECT refused on this filesystem: no bundle store probe")
    assert dev.convert_mbps > 0 and dev.checksum_mbps > 0
    assert dev.engine_load_factor is not None and dev.engine_load_factor > 0
    # The factor is the engine's measured loading time over what the probed steps predict: told
    # that every step runs 4x faster than measured, the same measured loads come out 4x dearer.
    from dataclasses import replace

    from edge.device.probes import engine_load_factors, measure_engine_loading

    measured = measure_engine_loading(bundle, (4,))
    assert measured[4][0] > 0 and measured[4][1] > 0  # seconds and expert loads per decoded token
    fast = replace(dev, storage_chunk_read_mbps=4 * dev.storage_chunk_read_mbps, checksum_mbps=4 * dev.checksum_mbps,
                   convert_mbps=4 * dev.convert_mbps, storage_chunk_latency_ms=dev.storage_chunk_latency_ms / 4)
    slow_steps, fast_steps = (engine_load_factors(bundle, d, measured)[4] for d in (dev, fast))
    assert slow_steps and fast_steps and fast_steps / slow_steps == pytest.approx(4.0), (slow_steps, fast_steps)
    m = read_manifest(bundle)
    p = plan(m.spec, dev, budget_bytes=300 << 20, context=512, backend="offload", locality=m.locality)
    assert any("measured in the engine on this bundle" in r for r in p.reasons)


def test_a_deployed_bundle_runs_its_plan_and_refuses_one_that_does_not_fit(bundle, tmp_path):
    """A bundle with plan.json runs the plan's slots, bits, prefetch and threads; a caller's option
    overrides that one setting; a plan whose cache does not fit beside what this process holds is
    refused with the numbers, not quietly resized."""
    from dataclasses import replace

    from edge.device.profile import cached_profile
    from edge.formats.bundle import read_manifest
    from edge.plan.planner import plan
    from edge.planned import write_plan

    m = read_manifest(bundle)
    p = plan(m.spec, cached_profile(), budget_bytes=300 << 20, context=512, backend="offload", locality=m.locality)
    assert p.prefetch_layers == 0  # the default model's prefetcher loads more than it saves (replayed)
    copy = tmp_path / "deployed"
    shutil.copytree(bundle, copy)
    from edge.hardware import spare_cpus

    with edge.load(copy) as model:  # no plan: the engine's defaults (prefetch where spare CPUs can hide it)
        assert model.backend.config.prefetch == spare_cpus() and model.notes == ()
    roomy = replace(p, budget_bytes=4 << 30, cache_slots_per_layer=(3, 4, 5, 6), threads=1, bits=3)
    write_plan(copy, roomy)
    with edge.load(copy) as model:
        cfg = model.backend.config
        assert cfg.slots == (3, 4, 5, 6) and not cfg.prefetch and model.backend.threads == 1
        assert (cfg.bits == 3).all()  # pinned at the planned bits, no HEBF
        assert model.notes[0].startswith("following plan.json") and len(model.notes) == 1
    with edge.load(copy, offload=OffloadOptions(prefetch=True)) as model:  # the caller's choice wins, alone
        assert model.backend.config.prefetch and model.backend.config.slots == (3, 4, 5, 6)
        assert model.notes[1] == "prefetch on given: overrides the plan's off"
    write_plan(copy, replace(roomy, budget_bytes=100 << 20))  # less than this test process holds
    with pytest.raises(edge.EdgeError, match=r"planned expert cache \(18 slots, .*\) does not fit the 100 MiB budget "
                                             r"here: this process already holds"):
        edge.load(copy)


@pytest.mark.parametrize("policy", POLICIES)
def test_the_simulator_replays_the_engines_cache_hit_for_hit(bundle, policy):
    """One eviction implementation: the engine decoding real text and the simulator replaying the
    routing the engine recorded see the same hits and misses, layer by layer, call by call."""
    from edge.moe.simulate import EngineReplay

    slots = (2, 3, 3, 4)
    with edge.load(bundle, offload=OffloadOptions(policy=policy, pin_bits=True, prefetch=False)) as m:
        be, s = m.backend, m.spec
        be.set_cache(slots, be.config.bits)
        routed: list[list[np.ndarray]] = [[] for _ in range(s.n_layers)]
        be.route_observers.append(lambda i, ids, w: routed[i].append(ids.copy()))
        engine_events: list[list[tuple[int, int]]] = [[] for _ in range(s.n_layers)]

        def step(tokens):
            before = [(x.hits, x.misses) for x in be.telemetry.layers]
            logits = be.eval(tokens)
            for i, x in enumerate(be.telemetry.layers):
                engine_events[i].append((x.hits - before[i][0], x.misses - before[i][1]))
            return int(np.argmax(logits))

        tok = step(m.tokenize("class Queue:\n    def __init__(self):\n"))
        for _ in range(40):
            tok = step([tok])
    for i in range(s.n_layers):
        replay = EngineReplay(s.n_experts, slots[i], policy, keep_events=True)
        replay.prefill(routed[i][0])
        for ids in routed[i][1:]:
            replay.decode(None, ids[0])
        assert replay.events == engine_events[i], f"layer {i}"
        assert sum(mi for _, mi in replay.events) > slots[i]  # more loads than slots: it really evicted
