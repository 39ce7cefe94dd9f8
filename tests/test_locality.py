"""SRP and SCH on hand-computed traces, against a brute-force cache simulator, and end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge.moe.locality import sch, srp
from edge.moe.trace import RoutingTrace


def test_srp_by_hand():
    # E=3, K=1, m=2, experts 0 0 1 1. Windows {0,0} {0,1} {1,1}: counts 2 | 1,1 | 2.
    # A = 1*2*3 = 6. theta=1: M = 2+1+1+2 = 6, P = 2*4 = 8, F1 = 12/14. theta=2: M=4, P=4, F1 = 8/10.
    # theta=0 predicts all: M=6, P=18, F1 = 12/24.
    f1, theta = srp(np.array([[0], [0], [1], [1]]), 3, 2)
    assert f1 == pytest.approx(12 / 14) and theta == 1


def test_srp_perfectly_local_routing_scores_one():
    ids = np.repeat(np.array([[0, 1]]), 32, axis=0)  # the same two experts for every token
    assert srp(ids, 8, 4)[0] == pytest.approx(1.0)


def test_sch_by_hand_prefers_future_use_over_recency():
    # E=3, K=1, m=2, experts 0 1 1 2 0. C=2 at token 3 (cache {0,1}, expert 2 arrives):
    # LRU would evict 0, but uses in tokens 3..4 are {2, 0}: 1 has none, so 1 is evicted and
    # token 4 (expert 0) hits. Free-slot convention: tokens 0 and 1 are hits (the cache had room).
    ids = np.array([[0], [1], [1], [2], [0]])
    np.testing.assert_allclose(sch(ids, 3, 2), [2 / 5, 4 / 5, 5 / 5])
    np.testing.assert_allclose(sch(ids, 3, 2, cold=True), [1 / 5, 2 / 5, 2 / 5])


def _simulate(ids, n_experts, m, capacity, cold):
    """Plain per-size simulation of the same policy: an independent reference for the stack pass."""
    T, K = ids.shape
    future = np.zeros(n_experts, int)
    for t in range(min(m, T)):
        np.add.at(future, ids[t], 1)
    last, clock, seen, cache, hits = np.zeros(n_experts, int), 0, set(), set(), 0
    for t in range(T):
        batch = [int(x) for x in ids[t]]
        before, n_seen = set(cache), len(seen)
        for x in batch:
            if x in before:
                hits += 1
            elif x not in seen:
                hits += (not cold) and n_seen < capacity
                n_seen += 1
        seen.update(batch)
        for x in batch:
            if x not in cache:
                if len(cache) >= capacity:
                    cache.remove(min(cache, key=lambda e: (future[e], last[e])))
                cache.add(x)
            clock += 1
            last[x], future[x] = clock, future[x] - 1
        if t + m < T:
            np.add.at(future, ids[t + m], 1)
    return hits / (T * K)


@pytest.mark.parametrize("seed", range(40))
def test_one_pass_sch_equals_per_size_simulation(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(2, 10))
    K = int(rng.integers(1, min(E, 4) + 1))
    T, m = int(rng.integers(1, 80)), int(rng.choice([1, 2, 4, 16]))
    p = rng.dirichlet(np.full(E, 0.5))  # skewed, like real routers
    ids = np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(T)])
    for cold in (False, True):
        want = [_simulate(ids, E, m, c, cold) for c in range(1, E + 1)]
        np.testing.assert_allclose(sch(ids, E, m, cold=cold), want)


def test_trace_round_trip(tmp_path):
    ids = np.array([[[0, 1], [2, 3]], [[1, 0], [3, 2]]], dtype=np.int16)
    tr = RoutingTrace(ids=ids, weights=np.full(ids.shape, 0.5, np.float32), n_experts=4, meta={"model": "x"})
    tr.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert (back.ids == ids).all() and back.meta["model"] == "x" and back.top_k == 2
    np.testing.assert_allclose(back.hotness(), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


def test_trace_and_locality_cli_on_the_default_model(tmp_path):
    from edge.data.corpus import stdlib_corpus

    text = tmp_path / "held.txt"
    text.write_text(stdlib_corpus().heldout_texts()[2][:12000])
    trace = tmp_path / "t.npz"
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge.cli", *a], capture_output=True, text=True, timeout=600)
    p = run("trace", "--text", str(text), "-o", str(trace))
    assert p.returncode == 0, p.stderr
    tr = RoutingTrace.load(trace)
    assert tr.n_layers == 4 and tr.top_k == 2 and tr.n_experts == 8 and tr.n_tokens > 1000
    p = run("locality", str(trace), "--json", "--plot", str(tmp_path / "sch.png"))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    for m in ("4", "16", "64", "256"):
        curve = report["sch_mean"][m]
        assert len(curve) == 8 and curve[-1] == pytest.approx(1.0)
        assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))  # more slots never hurt
        assert 2 * 2 / (8 + 2) < report["srp_mean"][m] < 1  # beats predicting all experts (theta=0)
    assert (tmp_path / "sch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run("locality", str(trace))
    assert table.returncode == 0 and "SRP" in table.stdout and "C/K" in table.stdout and "belady" in table.stdout


def test_locality_rejects_a_non_trace(tmp_path):
    bad = tmp_path / "t.npz"
    bad.write_text("nope")
    p = subprocess.run([sys.executable, "-m", "edge.cli", "locality", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "not an edge routing trace" in p.stderr
