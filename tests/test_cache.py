"""Cache policies, Belady's ceiling, slot allocation from SCH, and HEBF bit assignment."""

from __future__ import annotations

import numpy as np
import pytest

from edge.moe.simulate import simulate, simulate_engine, simulate_replies
from edge.moe.sizing import allocate_slots, cache_room, hebf_bits, slots_for
from edge.runtime.offload.prefetch import prefetch_guess


def test_policies_differ_where_they_should():
    # One-slot-short cache (C=2) on a cycle 0 1 2 0 1 2 ...: LRU always evicts the next one needed.
    cycle = np.array([[e] for e in [0, 1, 2] * 20])
    assert simulate(cycle, 3, 2, "lru") == 0.0
    assert simulate(cycle, 3, 2, "belady") == pytest.approx(29 / 60)
    # A hot expert 0 between one-off cold ones: frequency-based policies keep it, LRU keeps it too
    # only while it was the last use; all stay at or below the oracle.
    ids = np.array([[0], [1], [0], [2], [0], [3], [0], [4], [0], [5]] * 5)
    rates = {p: simulate(ids, 6, 2, p) for p in ("lru", "lfu", "locality", "lrfu", "belady")}
    assert rates["lfu"] >= rates["lru"] and rates["locality"] >= rates["lru"] and rates["lrfu"] >= rates["lru"]
    assert all(r <= rates["belady"] + 1e-12 for r in rates.values())


def test_belady_is_a_ceiling_on_random_traces():
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = rng.dirichlet(np.full(8, 0.4))
        ids = np.stack([rng.choice(8, 2, replace=False, p=p) for _ in range(200)])
        for c in (2, 3, 5):
            best = simulate(ids, 8, c, "belady")
            assert all(simulate(ids, 8, c, pol) <= best + 1e-12 for pol in ("lru", "lfu", "locality", "lrfu"))


def test_slots_go_where_the_sch_curve_gains_most():
    flat = np.linspace(0.25, 1.0, 8)  # gains evenly
    steep = np.array([0.3, 0.9, 0.97, 0.99, 1, 1, 1, 1])  # saturates at C=3..4
    slots = allocate_slots(np.stack([flat, steep]), top_k=1, total_slots=9, target=0.98)
    assert slots[1] <= 4 and slots[0] + slots[1] <= 9 and slots[0] > slots[1]
    with pytest.raises(ValueError):
        allocate_slots(np.stack([flat, steep]), top_k=2, total_slots=3)


def test_hebf_gives_the_hottest_experts_the_most_bits():
    hot = np.array([[0.4, 0.2, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01]])
    assert hebf_bits(hot, 4, 2).tolist() == [[4, 4, 3, 2, 2, 2, 2, 2]]
    assert hebf_bits(hot, 4, 4).tolist() == [[4] * 8]


def test_the_cache_gets_what_the_budget_leaves_after_the_headroom():
    budget, held = 1000 << 20, 600 << 20
    assert cache_room(budget, held) == budget - held - (48 << 20) - budget // 10
    slots = slots_for(cache_room(budget, held) // (5 << 20), n_layers=16, n_experts=16, top_k=2, sch_curves=None)
    assert len(slots) == 16 and min(slots) >= 2 and sum(slots) == cache_room(budget, held) // (5 << 20)
    assert slots_for(10_000, 2, 4, 2, None) == (4, 4)  # never more slots than experts


def test_engine_replay_counts_the_prefetchers_wrong_guesses():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(8, 0.4))
    ids = np.stack([rng.choice(8, 2, replace=False, p=p) for _ in range(300)])
    for c in (2, 4, 6):
        plain = (1 - simulate(ids, 8, c, "locality")) * 2  # demand misses per token
        right = simulate_engine(ids, ids, 8, c, "locality")  # the prefetcher always guesses right
        wrong = simulate_engine(ids, (ids + 4) % 8, 8, c, "locality")  # ... and never
        assert right == pytest.approx(plain, abs=0.05)
        assert wrong > right + 0.2  # each wrong guess is a load of its own, and evicts
        if c == 2:
            assert wrong > 2 * right
    full = simulate_engine(ids, (ids + 4) % 8, 8, 8, "locality")
    assert full * len(ids) == 8  # every expert resident: each loaded once


def test_prefetch_guess_is_the_routers_top_k():
    rng = np.random.default_rng(2)
    router, h = rng.standard_normal((8, 16)), rng.standard_normal((1, 16))
    norm = np.ones(16)
    want = np.argsort(-(h / np.sqrt((h**2).mean() + 1e-6)) @ router.T, axis=1)[0, :2]
    assert prefetch_guess(h, norm, router, 1e-6, 2) == [int(e) for e in want]


def test_reply_replay_counts_the_warm_up_after_each_prompt():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.full(8, 0.4))
    ids = np.stack([rng.choice(8, 2, replace=False, p=p) for _ in range(880)])
    for c in (2, 4, 8):
        steady = simulate_engine(ids, ids, 8, c, "locality")
        replies = simulate_replies(ids, ids, 8, c, "locality", prompt=24, reply=64)
        assert replies > steady  # every episode starts from an empty cache
    # a cache that holds every expert: steady use loads each expert once in 880 tokens, replies
    # load what their prompt did not touch, again in each of the 10 episodes
    assert simulate_engine(ids, ids, 8, 8, "locality") * 880 == 8
    missing = [len(set(range(8)) - set(ids[s : s + 24].ravel()) & set(ids[s + 24 : s + 88].ravel()))
               for s in range(0, 880, 88)]
    assert simulate_replies(ids, ids, 8, 8, "locality", 24, 64) * 640 == sum(missing)
    # prefetching off: demand loads only; a prefetcher that always guesses right moves about the same
    # loads (it evicts before the token's uses are counted, so not exactly the same)
    assert simulate_replies(ids, None, 8, 4, "locality", 24, 64) == pytest.approx(
        simulate_replies(ids, ids, 8, 4, "locality", 24, 64), rel=0.05)
    assert simulate_replies(ids, (ids + 4) % 8, 8, 4, "locality", 24, 64) > simulate_replies(ids, None, 8, 4, "locality", 24, 64)
    # a prompt needing more experts than fit is loaded in groups, as the engine prefills
    prompt_only = np.array([[0, 1], [2, 3], [4, 5]] + [[4, 5]] * 4)
    assert simulate_replies(prompt_only, prompt_only, 8, 2, "locality", 3, 4) == 0  # {4, 5} stay


def test_lrfu_weighs_recent_uses_more_than_old_ones():
    from edge.moe.policies import Policy

    p = Policy("lrfu", 4, half_life=2.0)
    for _ in range(6):
        p.on_token((0,))  # expert 0: popular long ago
    for _ in range(8):
        p.on_token((3,))
    p.on_token((1,))
    p.on_token((1,))  # expert 1: twice, just now
    assert p.crf(1) > p.crf(0)  # 0's six uses faded: 6 halvings later they count ~0.06 each
    assert p.victim([0, 1]) == 0
    assert Policy("lfu", 4).victim([0, 1]) in (0, 1)  # (lfu would keep the one with more uses in all)
    lfu = Policy("lfu", 4)
    for t in [(0,)] * 6 + [(3,)] * 8 + [(1,)] * 2:
        lfu.on_token(t)
    assert lfu.victim([0, 1]) == 1  # the behaviour lrfu changes


def test_without_routing_data_the_cache_spreads_evenly_over_the_layers():
    slots = slots_for(1700, n_layers=48, n_experts=128, top_k=8, sch_curves=None)
    assert sum(slots) == 1700 and max(slots) - min(slots) <= 1  # not 11 full layers and 37 at top-k
