"""Distance-based grouping and the layer split: pure functions on numbers."""

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.d2d.shard import Link, distance_matrix, embed, group, link_seconds
from edge.d2d.split import Member, ModelCosts, predict, proportional_split, split_layers
from edge.errors import EdgeError

MiB = 1 << 20
NEAR, FAR = Link(0.0005, 1e9 / 8), Link(0.080, 20e6 / 8)   # 0.5 ms at 1 Gbit/s; 80 ms RTT at 20 Mbit/s
COSTS = ModelCosts(n_layers=24, layer_bytes=40 * MiB, coordinator_bytes=200 * MiB, hop_bytes=2 * 8192,
                   round_trips=2.0)


def test_classical_mds_recovers_euclidean_distances():
    pts = np.array([[0, 0], [3, 0], [0, 4], [5, 5], [-2, 1.5]], dtype=float)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    got = embed(d, 2)
    assert np.allclose(np.linalg.norm(got[:, None] - got[None], axis=-1), d, atol=1e-9)


def test_distance_matrix_takes_the_slower_direction_and_names_a_missing_pair():
    links = {("a", "b"): Link(0.001, 1e8), ("b", "a"): Link(0.004, 1e8), ("a", "c"): FAR, ("b", "c"): FAR}
    d = distance_matrix(["a", "b", "c"], links, payload_bytes=1000)
    assert d[0, 1] == d[1, 0] == pytest.approx(link_seconds(Link(0.004, 1e8), 1000))
    assert d[0, 2] == pytest.approx(0.080 + 1000 / (20e6 / 8))
    with pytest.raises(EdgeError, match="between a and d"):
        distance_matrix(["a", "b", "d"], links, 1000)


def two_sites() -> tuple[np.ndarray, list[str]]:
    """Peers 0-3 in one room (0.5 ms apart), 4-6 in another (0.5 ms), 40 ms between the rooms."""
    names = [f"p{i}" for i in range(7)]
    site = [0, 0, 0, 0, 1, 1, 1]
    links = {(a, b): (NEAR if site[i] == site[j] else Link(0.040, 20e6 / 8))
             for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)}
    return distance_matrix(names, links, 16384), names


def test_groups_follow_distance_and_each_holds_its_anchor():
    d, _ = two_sites()
    assert group(d, anchors=[1, 5]) == [[1, 0, 2, 3], [5, 4, 6]]
    # anchors in the same room: the groups split that room, and the far room joins one of them,
    # but neither anchor is taken from its group
    groups = group(d, anchors=[0, 1])
    assert [g[0] for g in groups] == [0, 1] and sorted(i for g in groups for i in g) == list(range(7))
    assert {4, 5, 6} <= set(groups[0]) or {4, 5, 6} <= set(groups[1])


def test_grouping_holds_under_10ms_of_jitter_in_20_of_20_runs():
    """Every measured RTT off by up to +-10 ms (uniform, each pair on its own): the rooms still
    come out as the groups, anchors 1 and 5, in 20 of 20 draws."""
    rng = np.random.default_rng(7)
    names = [f"p{i}" for i in range(7)]
    site = [0, 0, 0, 0, 1, 1, 1]
    for _ in range(20):
        links = {(a, b): Link(max(0.0, (0.0005 if site[i] == site[j] else 0.040) + rng.uniform(-0.010, 0.010)),
                              1e9 / 8 if site[i] == site[j] else 20e6 / 8)
                 for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)}
        groups = group(distance_matrix(names, links, 16384), anchors=[1, 5])
        assert [sorted(g) for g in groups] == [[0, 1, 2, 3], [4, 5, 6]]


def test_group_refuses_bad_anchors():
    d, _ = two_sites()
    for bad in ([], [0, 0], [9]):
        with pytest.raises(EdgeError, match="anchors"):
            group(d, anchors=bad)


def test_the_far_peer_with_the_most_memory_is_left_out_when_the_near_ones_hold_the_model():
    me = Member("me", free_bytes=600 * MiB, layer_s=0.002)
    near1, near2 = Member("near1", 500 * MiB, 0.002, NEAR), Member("near2", 500 * MiB, 0.002, NEAR)
    far = Member("far", 4000 * MiB, 0.001, FAR)   # faster and roomier, but 80 ms away
    s = split_layers(me, [near1, near2, far], COSTS)
    assert "far" not in s.layers and sum(s.layers.values()) == 24
    assert s.layers["me"] == 10   # (600 - 200) MiB / 40 MiB
    assert any(r.startswith("far left out: with it") for r in s.reasons)
    assert s.predicted_s == pytest.approx(24 * 0.002 + 2 * (2 * 0.0005 + 16384 / (1e9 / 8)))
    # exo's placement gives the far peer most of the layers
    prop = proportional_split([Member("me", 400 * MiB, 0), near1, near2, far], 24)
    assert prop["far"] == max(prop.values()) and sum(prop.values()) == 24


def test_a_far_peer_is_used_when_nothing_else_holds_the_model():
    me = Member("me", free_bytes=600 * MiB, layer_s=0.002)
    far = Member("far", 4000 * MiB, 0.002, FAR)
    s = split_layers(me, [far], COSTS)
    assert s.layers == {"me": 10, "far": 14}
    assert s.network_s == pytest.approx(2 * 0.080 + 16384 / (20e6 / 8))


def test_the_coordinators_hand_over_cost_is_paid_once_per_remote_member_and_can_leave_one_out():
    me = Member("me", free_bytes=1200 * MiB, layer_s=0.002)   # holds all 24 layers, at 2 ms each
    helper = Member("helper", 4000 * MiB, 0.001, NEAR)         # twice as fast, 0.5 ms away
    cheap = split_layers(me, [helper], COSTS)
    assert cheap.layers == {"me": 0, "helper": 24}               # 24 ms + 1.1 ms of link against 48 ms
    costly = split_layers(me, [helper], dataclasses.replace(COSTS, run_s=0.030))
    assert costly.layers == {"me": 24}                           # + 30 ms per hand-over: 55 ms against 48
    assert any(r.startswith("helper left out") for r in costly.reasons)
    assert predict(me, [helper], cheap.layers, dataclasses.replace(COSTS, run_s=0.030))[1] == pytest.approx(
        predict(me, [helper], cheap.layers, COSTS)[1] + 0.030)


def test_an_impossible_group_names_the_numbers():
    with pytest.raises(EdgeError, match=r"holds 0.39 GiB for layers; the model's 24 layers need 0.94 GiB"):
        split_layers(Member("me", 600 * MiB, 0.002), [], COSTS)
    with pytest.raises(EdgeError, match="100 MiB free; the embeddings"):
        split_layers(Member("me", 100 * MiB, 0.002), [], COSTS)


members_st = st.lists(st.tuples(st.integers(0, 12), st.floats(0.0005, 0.01), st.floats(0.0001, 0.1),
                                st.floats(1e6, 1e9)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(members_st, st.integers(0, 12))
def test_the_split_is_the_best_of_every_integer_split(specs, mine):
    """Against brute force over every way of dealing 12 layers to the members."""
    costs = ModelCosts(n_layers=12, layer_bytes=10, coordinator_bytes=0, hop_bytes=1000, round_trips=2.0,
                       layer_wire_bytes=300, tail_bytes=20000)
    me = Member("me", mine * 10, 0.003)
    remotes = [Member(f"r{i}", cap * 10, t, Link(rtt, bw)) for i, (cap, t, rtt, bw) in enumerate(specs)]
    caps = [mine] + [c for c, *_ in specs]
    best = None
    for deal in itertools.product(*(range(c + 1) for c in caps)):
        if sum(deal) != 12:
            continue
        used = [m for k, m in zip(deal[1:], remotes) if k]
        t = deal[0] * 0.003 + sum(k * m.layer_s + ((2 * m.link.rtt_s + (1000 + 300 * k) / m.link.bytes_per_s) if k else 0)
                                  for k, m in zip(deal[1:], remotes))
        t += 20000 / max(m.link.bytes_per_s for m in used) if used else 0
        best = t if best is None else min(best, t)
    if best is None:
        with pytest.raises(EdgeError):
            split_layers(me, remotes, costs)
        return
    s = split_layers(me, remotes, costs)
    assert s.predicted_s == pytest.approx(best, rel=1e-9)
    assert sum(s.layers.values()) == 12 and all(s.layers.get(m.name, 0) <= c for m, c in zip([me, *remotes], caps))
