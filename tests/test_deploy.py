"""edge deploy and edge bench end to end on the embedded default model, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_deploy_default_model_then_bench(tmp_path):
    out = tmp_path / "deployed"
    p = _cli("deploy", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "deployed edge-default-moe" in p.stdout and "smoke run decode" in p.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["backend"] == "llamacpp" and (out / "manifest.json").is_file()
    b = _cli("bench", str(out), "--tokens", "16", "--runs", "2")
    assert b.returncode == 0, b.stderr
    assert "decode tokens/s" in b.stdout and "peak memory" in b.stdout and "%" in b.stdout
    assert "median of 2 runs of 16 tokens" in " ".join(b.stdout.split())  # the title may wrap


def test_deploy_under_a_small_budget_offloads(tmp_path):
    out = tmp_path / "small"
    p = _cli("deploy", "--budget", "300MiB", "--context", "512", "-o", str(out), "--device", "auto")
    # the default model fits any realistic budget whole; a budget this small still fits it
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "plan.json").read_text())["budget_bytes"] == 300 << 20


def test_bench_without_a_plan_is_a_clear_error(tmp_path):
    import edge

    edge.build(None, tmp_path / "b", format="gguf", weight_type="q8_0")
    p = _cli("bench", str(tmp_path / "b"))
    assert p.returncode == 2 and "has no plan.json" in p.stderr and "Traceback" not in p.stderr
