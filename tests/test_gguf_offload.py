"""A MoE GGUF run straight from the file on the offload engine: the same next-token distribution as
llama.cpp on that file, experts really read from it, routing recorded in use and used again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import edge


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    """The default model as a Q4_K_M GGUF made by llama.cpp's own quantizer (a Q4_K/Q5_0/Q6_K/Q8_0 mix)."""
    out = tmp_path_factory.mktemp("q4km") / "b"
    edge.build(None, out, format="gguf", weight_type="q4_k_m")
    return out / "model.gguf"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_teacher_forced_distribution_agrees_with_llama_cpp(q4km):
    """64 positions of held-out text, each next-token distribution of edge's offload engine (a
    2-slot cache per layer, so experts are read from the file all along) against llama.cpp's on
    the same file: top-1 agreement >= 95%, small mean KL (measured here: 98.5%, 0.004 nats)."""
    from edge.data.corpus import stdlib_corpus
    from edge.runtime.llamacpp import LlamaCppBackend
    from edge.runtime.offload.open import open_gguf
    from edge.runtime.offload.options import OffloadOptions

    ll = LlamaCppBackend(q4km, n_ctx=256, n_threads=2, all_logits=True)
    eng = open_gguf(q4km, budget=None, options=OffloadOptions(prefetch=False).resolved(), n_ctx=256, threads=2)
    try:
        eng.set_cache((2,) * eng.spec.n_layers, eng.config.bits)
        text = stdlib_corpus().heldout_texts()[1][:4000]
        ids = ll.model.tokenize(text.encode(), add_bos=False, special=False)[:65]
        ours = np.concatenate([eng.eval(ids[:1], all_logits=True)] + [eng.eval([t], all_logits=True) for t in ids[1:64]])
        theirs = ll.eval_all(ids[:64])
        m = eng.metrics()
    finally:
        eng.close()
        ll.close()
    agree = float((ours.argmax(1) == theirs.argmax(1)).mean())
    p, q = _log_softmax(theirs), _log_softmax(ours)
    kl = float((np.exp(p) * (p - q)).sum(axis=1).mean())
    assert agree >= 0.95, agree
    assert kl < 0.05, kl
    assert m["expert_source"] == "gguf" and m["cache_misses"] > 100 and m["bytes_read"] > 0
    assert set(m["bits_histogram"]) <= {"Q5_0/Q5_0/Q4_K", "Q5_0/Q5_0/Q6_K"}  # served in the file's own types


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=300)


def test_routing_seen_in_use_is_recorded_and_sizes_the_next_load(q4km):
    from edge.data.corpus import stdlib_corpus

    prompt = stdlib_corpus().heldout_texts()[2][:1500]  # a few hundred tokens: enough to size caches by
    first = _cli("run", prompt, "-m", str(q4km), "--backend", "offload", "-n", "40", "-t", "0", "--metrics")
    assert first.returncode == 0, first.stderr
    assert "--backend offload: the offload engine runs it" in first.stderr
    assert "routing recorded on earlier runs" not in first.stderr
    loc = _cli("locality", str(q4km), "--json")
    assert loc.returncode == 0, loc.stderr
    report = json.loads(loc.stdout)
    assert report["n_experts"] == 8 and len(report["srp_per_layer"]) == 4  # 4 layers of the recorded routing
    assert abs(sum(report["hotness"][0]) - 1) < 1e-3
    second = _cli("run", "class A:\n", "-m", str(q4km), "--backend", "offload", "-n", "8", "-t", "0")
    assert second.returncode == 0, second.stderr
    assert "expert cache spread over the layers by the routing recorded on earlier runs" in second.stderr


def test_locality_of_a_gguf_never_run_says_what_to_do(tmp_path):
    edge.build(None, tmp_path / "b", format="gguf", weight_type="q8_0")  # another file, another identity
    p = _cli("locality", str(tmp_path / "b" / "model.gguf"))
    assert p.returncode == 2 and "no routing recorded for model.gguf yet: run it on the offload engine" in p.stderr
    p = _cli("locality", str(tmp_path / "missing.gguf"))
    assert p.returncode == 2 and "no such file" in p.stderr


def test_routing_is_recorded_when_an_sdk_user_never_closes_the_model(q4km, tmp_path):
    """An app that loads a GGUF and exits without close() (or a with-block) still leaves the
    routing it ran for the next load; a close() and the exit after it record each token once."""
    code = ("import edge, sys\n"
            "m = edge.load(sys.argv[1], backend='offload')\n"
            "m.create_completion('def main(argv):\\n', max_tokens=12, temperature=0)\n"
            "if sys.argv[2] == 'close':\n"
            "    m.close()\n")
    from edge.routing import trace_path

    env = {**os.environ, "EDGE_CACHE_DIR": str(tmp_path / "cache")}
    counts = []
    for how in ("exit", "close"):
        p = subprocess.run([sys.executable, "-c", code, str(q4km), how], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        where = tmp_path / "cache" / "routing" / trace_path(q4km).name
        assert where.is_file(), p.stderr
        counts.append(np.load(where)["ids"].shape[0])
    # the prompt (6 tokens) and 12 decoded, per run; the second run appended once, not twice
    assert counts[0] > 0 and counts[1] == 2 * counts[0], counts


def test_plans_for_a_gguf_time_the_engines_reads_on_the_file_itself(q4km):
    """`edge plan x.gguf` here prices expert loads at the speed the engine's own reads reach on
    that file (its disk, its spans), not the profile's probe file."""
    from edge.device.gguf_probes import gguf_load_costs
    from edge.device.profile import at_gguf, cached_profile

    costs = gguf_load_costs(q4km, loads=32)
    if costs is None:
        pytest.skip("O_DIRECT refused on this filesystem: buffered reads are not timed")
    assert costs["read_mbps"] > 0 and costs["reads_per_load"] == 3
    base = cached_profile()
    prof = at_gguf(base, q4km)
    assert prof.storage_path == str(q4km) and prof.storage_chunk_read_mbps > 0 and prof.storage_chunk_latency_ms == 0
    assert prof.gemv_types == base.gemv_types and prof.memory_bandwidth_gbps == base.memory_bandwidth_gbps


def test_plans_for_a_gguf_take_the_engines_compute_measured_on_the_file(q4km):
    """The compute probe times the engine itself on the file's weights with every expert cached
    (no load on the timed steps), and the plan prices a token at that compute plus its loads."""
    from edge.device.gguf_probes import gguf_step_compute
    from edge.device.profile import at_gguf, cached_profile
    from edge.formats.gguf_read import open_reader, read_spec, stored_experts
    from edge.plan.planner import plan

    step = gguf_step_compute(q4km, threads=2, repeats=3)
    assert step["runs"] == 3 and 0 < step["step_s"] < 5
    prof = at_gguf(cached_profile(), q4km)
    assert prof.gguf_step_compute_s > 0
    reader = open_reader(q4km)
    spec = read_spec(q4km, reader)
    size = q4km.stat().st_size
    p = plan(spec, prof, budget_bytes=int(0.8 * size) + (200 << 20), context=256, backend="offload",
             model_name="q4km", stored=stored_experts(reader, spec))
    step_s = prof.gguf_step_compute_s + p.predicted_loads_per_token * p.predicted_load_s
    assert p.predicted_decode_tok_s == pytest.approx(1 / step_s, rel=1e-6)
    assert any("measured on this file, no loads" in r for r in p.reasons)
