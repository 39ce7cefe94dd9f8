"""BitStack stacks in offload bundles: contiguous storage, the compression table, resizing a
running model (engine accounting, same output at full size), refusals, the elastic manager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import edge
from edge.errors import EdgeError
from edge.formats.bundle import read_manifest
from edge.quant.stack import LoadedStack, StackIndex
from edge.runtime.offload.budget import budget_for_stack

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
BUDGET = 800 << 20  # a fresh process's whole budget (the elastic child below)


def in_process_budget() -> int:
    """A budget for this (pytest) process: what it holds now (with torch ~330 MiB, more after
    earlier tests) plus the 470 MiB the stacked model needs at full size."""
    import psutil

    return psutil.Process().memory_info().rss + (470 << 20)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stacked") / "default-bitstack"
    edge.build(None, out, format="offload", bitstack=True)
    return out


def test_the_stack_is_one_contiguous_prefix_with_a_compression_table(bundle):
    m = read_manifest(bundle)
    index = StackIndex.from_dict(m.bitstack)
    assert {f.path: f.role for f in m.files}["dense.stack"] == "bitstack"
    assert len(index.matrices) == 4 * m.spec.n_layers and index.k == 16
    assert index.n_blocks == 16 * len(index.matrices)
    # every matrix's first block comes first: the smallest size is one block per matrix
    assert sorted(j for j, lv in index.order[: index.min_blocks]) == list(range(len(index.matrices)))
    table = m.bitstack["table"]
    assert table[0]["blocks"] == index.min_blocks and table[-1]["blocks"] == index.n_blocks
    assert all(a["bytes"] < b["bytes"] for a, b in zip(table, table[1:]))
    assert all(sum(row["per_matrix"]) == row["blocks"] for row in table)
    # "the first N blocks" is the file's bytes from blocks_offset on, in one piece
    stack = LoadedStack(bundle / "dense.stack", index)
    try:
        n = table[len(table) // 2]["blocks"]
        stack.resize(n)
        raw = (bundle / "dense.stack").read_bytes()
        assert bytes(stack._buf[: index.bytes_at(n)]) == raw[index.blocks_offset : index.blocks_offset + index.bytes_at(n)]
        assert stack.levels() == table[len(table) // 2]["per_matrix"]
    finally:
        stack.close()


def test_dense_weights_leave_out_the_stacked_matrices(bundle):
    from edge.formats.safetensors_io import read_header

    names = set(read_header(bundle / "dense.safetensors"))
    assert not any(n.endswith((".wq", ".wk", ".wv", ".wo")) for n in names)
    assert "layers.0.attn_norm" in names


def test_a_running_model_shrinks_and_grows_between_three_sizes(bundle):
    with edge.load(bundle, memory_budget=in_process_budget()) as m:
        be = m.backend
        index = be.stack.index
        assert be.stack.n_loaded == index.n_blocks  # a roomy budget loads the whole stack
        prompt = m.tokenize("def fibonacci(n):\n    ")
        be.eval(prompt)
        nxt = [int(np.argmax(be.eval([prompt[-1]])))]
        be.truncate(len(prompt))
        full = be.eval(nxt).copy()
        cache = m.metrics()["expert_cache_bytes"]
        outputs = {}
        for share in (0.5, 0.2, 1.0):  # shrink, shrink further, grow back
            target = int(index.full_bytes * share)
            rec = m.set_memory_budget(budget_for_stack(be, target))
            got = m.metrics()
            n = got["stack_blocks"]
            assert n == index.blocks_within(target)  # the most blocks that fit
            assert got["stack_bytes"] == index.bytes_at(n) == rec["stack_bytes"]  # accounting is exact
            assert got["expert_cache_bytes"] == cache  # the stack moved, the expert cache did not
            be.truncate(len(prompt))  # the conversation (the prompt's KV cache) is kept
            outputs[share] = be.eval(nxt).copy()
        assert m.metrics()["stack_blocks"] == index.n_blocks
        assert np.array_equal(outputs[1.0], full)  # full size again: exactly the output before shrinking
        assert not np.array_equal(outputs[0.2], full)  # the small stack really is another model
        assert np.abs(outputs[0.2] - full).max() > np.abs(outputs[0.5] - full).max()
        assert [r["reason"] for r in m.metrics()["resizes"]] == ["set_memory_budget"] * 3


def test_an_impossible_budget_is_refused_and_changes_nothing(bundle):
    with edge.load(bundle, memory_budget=in_process_budget()) as m:
        before = m.metrics()
        with pytest.raises(EdgeError, match=r"memory budget 50 MiB is too small: the engine holds .* smallest stack"):
            m.set_memory_budget("50MiB")
        after = m.metrics()
        for key in ("stack_bytes", "stack_blocks", "expert_cache_bytes", "memory_budget_bytes"):
            assert after[key] == before[key]


def test_a_gguf_model_refuses_to_resize(tmp_path):
    edge.build(None, tmp_path / "g", format="gguf", weight_type="q8_0")
    with edge.load(tmp_path / "g") as m:
        assert m.backend_name == "llamacpp"
        with pytest.raises(EdgeError, match="the llamacpp backend cannot resize while it runs"):
            m.set_memory_budget("100MB")


def test_a_truncated_stack_is_a_one_line_error(bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    with open(bad / "dense.stack", "r+b") as f:
        f.truncate((bad / "dense.stack").stat().st_size - 100)
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "run", "x", "-m", str(bad), "-n", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dense.stack" in proc.stderr and "manifest says" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup memory limits need root")
def test_the_elastic_manager_shrinks_when_the_cgroup_limit_is_lowered_mid_run(bundle, tmp_path):
    """A child generates with --elastic inside a cgroup; once it is decoding, the limit drops to
    just above its usage. The manager must shrink the stack (telemetry shows it), and generation
    must finish without an OOM kill."""
    sys.path.insert(0, str(ROOT / "bench"))
    from cgroup import MemoryCap

    script = tmp_path / "child.py"
    script.write_text(f"""
import json, sys, time
import edge
m = edge.load({str(bundle)!r}, memory_budget={BUDGET})
m.elastic()
be = m.backend
prompt = m.tokenize("import os\\n")
logits = be.eval(prompt)
print("decoding", flush=True)
for i in range(400):
    logits = be.eval([int(logits.argmax())])
    if be.n_past >= be.n_ctx - 1:
        be.truncate(len(prompt))
    time.sleep(0.01)
print(json.dumps(m.metrics()), flush=True)
m.close()
""")
    with MemoryCap(2 << 30) as cap:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: (cap.path / "cgroup.procs").write_text(str(os.getpid())))
        assert proc.stdout.readline().strip() == "decoding"
        time.sleep(0.5)
        usage = int((cap.path / "memory.usage_in_bytes").read_text())
        cap.set_limit(usage + (32 << 20))  # free drops under the manager's 96 MiB low watermark
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        assert cap.oom_kills == 0
    metrics = json.loads(out.strip().splitlines()[-1])
    shrinks = [r for r in metrics["resizes"] if r["reason"].startswith("elastic") and r["budget_bytes"] < BUDGET]
    assert shrinks, metrics["resizes"]
    assert metrics["stack_bytes"] < metrics["stack_full_bytes"]
    assert metrics["tokens_decoded"] >= 400
