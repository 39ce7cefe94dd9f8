"""edge deploy and edge bench end to end on the embedded default model, as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_deploy_default_model_then_bench(tmp_path):
    out = tmp_path / "deployed"
    p = _cli("deploy", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "deployed edge-default-moe" in p.stdout and "smoke run decode" in p.stdout
    plan = json.loads((out / "plan.json").read_text())
    # it fits whole: llama.cpp or ONNX Runtime, whichever the profile predicts faster (by 1.1x for ORT),
    # and the bundle is the one that backend runs
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"llamacpp": "gguf", "ort": "onnx"}[plan["backend"]] == manifest["format"]
    b = _cli("bench", str(out), "--tokens", "16", "--runs", "2")
    assert b.returncode == 0, b.stderr
    assert "median of 2 runs of 16 tokens" in " ".join(b.stdout.split())  # the title may wrap
    row = re.search(r"decode tokens/s\s*│?\s*([\d.,]+)\s*│?\s*([\d.,]+)\s*│?\s*([+-][\d.]+)%", b.stdout)
    assert row, b.stdout
    predicted, measured, error = (float(g.replace(",", "")) for g in row.groups())
    assert predicted == pytest.approx(plan["predicted_decode_tok_s"], rel=0.01)  # the plan's own prediction
    assert measured > 0 and error == pytest.approx((predicted - measured) / measured * 100, abs=0.15)
    assert re.search(r"time to first token s.*not predicted.*[\d.]+", b.stdout)


def test_a_deployed_offload_bundle_runs_its_plan(tmp_path, tiny_synthetic):
    """edge deploy at a budget where only some experts fit; edge run on the bundle then runs the
    engine with exactly the plan's cache slots, bits, prefetch and threads, and says so in one line;
    an explicit flag overrides that one setting and says so."""
    out = tmp_path / "deployed"
    p = _cli("deploy", str(tiny_synthetic), "--backend", "offload", "--budget", "230MiB", "--context", "512",
             "-o", str(out))
    assert p.returncode == 0, p.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["backend"] == "offload" and plan["budget_bytes"] == 230 << 20
    slots = plan["cache_slots_per_layer"]
    assert 2 * 2 <= sum(slots) < 2 * 16  # it really offloads: the cache holds some of the experts

    def run(*flags):
        r = _cli("run", "def main(", "-m", str(out), "-n", "8", "-t", "0", "--metrics", *flags)
        assert r.returncode == 0, r.stderr
        notes = [line for line in r.stderr.splitlines() if "plan" in line]
        return json.loads(r.stderr[r.stderr.index("{"):]), notes

    metrics, notes = run()
    assert notes[0].startswith("following plan.json") and len(notes) == 1
    assert metrics["cache_slots_per_layer"] == slots
    assert metrics["expert_bits"] == [plan["bits"]]
    assert metrics["prefetch"] == (plan["prefetch_layers"] > 0)
    assert metrics["threads"] == plan["threads"]
    assert metrics["memory_budget_bytes"] == plan["budget_bytes"]
    flipped = "--no-prefetch" if plan["prefetch_layers"] else "--prefetch"
    metrics, notes = run(flipped, "--threads", "1")
    assert metrics["prefetch"] != (plan["prefetch_layers"] > 0) and metrics["threads"] == 1
    assert metrics["cache_slots_per_layer"] == slots  # the other settings stay the plan's
    assert any("prefetch" in n and "overrides the plan" in n for n in notes)
    assert any("threads 1 given: overrides the plan's" in n for n in notes)


def test_an_unreadable_plan_is_a_clear_error(tmp_path):
    import edge

    edge.build(None, tmp_path / "b", format="gguf", weight_type="q8_0")
    (tmp_path / "b" / "plan.json").write_text('{"backend": "offload", "bits": "four"')
    r = _cli("run", "x", "-m", str(tmp_path / "b"), "-n", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "plan.json is not valid JSON" in r.stderr
    (tmp_path / "b" / "plan.json").write_text('{"backend": "offload", "bits": "four"}')
    r = _cli("run", "x", "-m", str(tmp_path / "b"), "-n", "1")
    assert r.returncode == 2 and "plan.json: field" in r.stderr


def test_bench_without_a_plan_is_a_clear_error(tmp_path):
    import edge

    edge.build(None, tmp_path / "b", format="gguf", weight_type="q8_0")
    p = _cli("bench", str(tmp_path / "b"))
    assert p.returncode == 2 and "has no plan.json" in p.stderr and "Traceback" not in p.stderr
