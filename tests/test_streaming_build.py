"""Offload bundles built by streaming: bounded memory (a checkpoint 4x larger than a cgroup cap
builds inside the cap), the trunk at the engine's precision (a GGUF's own tensors, untouched),
and a bundle that computes the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge
from helpers import offload_and_reference_perplexity
from edge.formats.bundle import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_a_bundle_from_a_gguf_keeps_its_trunk_tensors_and_types(tmp_path):
    from edge.formats.gguf_read import open_reader

    edge.build(None, tmp_path / "g", format="gguf", weight_type="q4_k_m")
    src = tmp_path / "g" / "model.gguf"
    edge.build(src, tmp_path / "o", format="offload")
    a, b = open_reader(src), open_reader(tmp_path / "o" / "dense.gguf")
    theirs = {t.name: t for t in a.tensors if "_exps." not in t.name}
    ours = {t.name: t for t in b.tensors}
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type and ours[name].shape == t.shape
        assert np.array_equal(ours[name].bytes_of(b), t.bytes_of(a)), name  # bytes untouched
    m = read_manifest(tmp_path / "o")
    assert m.tokenizer.kind == "gguf" and m.experts["max_bits"] == 6  # a GGUF holds fewer bits than 8
    assert m.locality["calibration"] == "stdlib training split" and len(m.locality["sch"]) == 4
    with edge.load(tmp_path / "o") as model:  # its tokenizer is the GGUF's
        out = model.create_completion("def main(", max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] == 8


def test_a_streamed_bundle_computes_the_model(tmp_path, default_dir):
    """4-bit experts and Q8_0 trunk read from dense.gguf: perplexity within 3% of the f32 reference."""
    edge.build(None, tmp_path / "o", format="offload")
    assert (tmp_path / "o" / "dense.gguf").is_file() and not (tmp_path / "o" / "dense.safetensors").exists()
    ours, ref = offload_and_reference_perplexity(tmp_path / "o", default_dir)
    assert abs(ours / ref - 1) < 0.03, (ours, ref)


def test_calibration_text_is_the_users_choice(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("for i in range(10):\n    print(i)\n" * 200)
    edge.build(None, tmp_path / "o", format="offload", calibration=text)
    loc = read_manifest(tmp_path / "o").locality
    assert loc["calibration"] == str(text)
    default = tmp_path / "d"
    edge.build(None, default, format="offload")
    assert read_manifest(default).locality["hotness"] != loc["hotness"]  # other text, other routing


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup memory limits need root")
def test_a_checkpoint_four_times_larger_than_the_cap_builds_inside_it(tmp_path):
    """A 1.1 GB f16 checkpoint (2.2 GB as float32) builds into an offload bundle inside a 256 MiB
    cgroup cap: nothing holds more than one tensor or one expert at a time (peak RSS here ~200 MiB,
    of which ~105 are Python and the libraries)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from cgroup import MemoryCap
    from synthetic import save_hf, synthetic_weights

    ckpt = tmp_path / "ckpt"
    save_hf(synthetic_weights(layers=4, hidden=1024, heads=8, kv_heads=2, experts=16, top_k=2, ffn=2816), ckpt)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    cap = 256 << 20
    assert size >= 4 * cap
    out = tmp_path / "bundle"
    with MemoryCap(cap) as group:
        p = group.run([sys.executable, "-m", "edge.cli", "build", str(ckpt), "-o", str(out), "--format", "offload"],
                      capture_output=True, text=True, timeout=900)
        assert group.oom_kills == 0
        assert group.peak_bytes <= cap
    assert p.returncode == 0, p.stderr
    m = read_manifest(out)
    assert m.spec.n_layers == 4 and m.experts["n_experts"] == 16
    run = subprocess.run([sys.executable, "-m", "edge.cli", "run", "def f(", "-m", str(out), "-n", "4", "-t", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
