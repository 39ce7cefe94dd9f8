"""Groups on real agents: by measured distance, a member nearer to another anchor than to this
device joins that anchor's group and gets no layer here (both agents reached from the coordinator
through bench/linkemu.py at 20 ms, between themselves directly on loopback, which each measures
for real with the agents' own `measure` op); and a member that joins while a model runs is
placed, the generation going on."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2d_agents import EDGE, AgentProc, free_port, pair
from edge.d2d.backend import GroupBackend
from edge.d2d.identity import Identity
from edge.runtime.llamacpp import LlamaCppBackend, LoadOptions
from edge.sdk.group import MembershipWatch, measure_peers

LINKEMU = Path(__file__).resolve().parents[1] / "bench" / "linkemu.py"


@pytest.fixture
def far_pair(tmp_path):
    """An anchor and a plain member, each 20 ms from the coordinator and ~0 ms from each other."""
    agents = [AgentProc(tmp_path / "anchor", "anchor", extra=("--anchor",)), AgentProc(tmp_path / "x", "x")]
    links = []
    try:
        for a in agents:
            assert pair(a, tmp_path / "coord").returncode == 0
            a.line("serving the cluster")
            port = free_port()
            links.append(subprocess.Popen([sys.executable, str(LINKEMU), "--listen", f"127.0.0.1:{port}", "--target",
                                           a.address, "--rtt-ms", "20", "--mbit", "0"], stdout=subprocess.PIPE,
                                          text=True))
            assert "linkemu listening" in links[-1].stdout.readline()
            links[-1].address = f"127.0.0.1:{port}"
        yield tmp_path / "coord", links
    finally:
        for p in links:
            p.kill()
        for a in agents:
            a.stop()


def test_a_member_nearer_another_anchor_joins_its_group_and_gets_no_layer(far_pair, default_gguf_f32):
    coord, (to_anchor, to_x) = far_pair
    r = subprocess.run(EDGE + ["peers", "--peer", to_anchor.address, "--peer", to_x.address,
                               "-m", str(default_gguf_f32), "--ctx", "256", "--json", "--identity", str(coord)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    rows = {p["peer"]: p for p in got["peers"]}
    assert rows["anchor"]["rtt_ms"] > 15 and rows["x"]["rtt_ms"] > 15       # both far from this device
    assert rows["anchor"]["anchor"] and rows["anchor"]["group"] == "anchor"
    assert rows["x"]["group"] == "anchor"                                     # x is next to the anchor
    assert rows["x"]["layers"] == 0 and rows["anchor"]["layers"] == 0
    assert "x: in anchor's group (nearer to that anchor than to this device); not used here" in got["split"]
    assert "anchor: an anchor, it leads a group of its own; not used here" in got["split"]


def greedy_tokens(backend, n: int, at: int | None = None, then=None) -> list[int]:
    logits, out = backend.eval([272, 358, 621, 269]), []
    for i in range(n):
        if i == at:
            then()
        out.append(int(np.argmax(logits)))
        logits = backend.eval([out[-1]])
    return out


@pytest.fixture(scope="module")
def expected(default_gguf_f32) -> list[int]:
    """The greedy tokens of the default model on this device alone."""
    one = LlamaCppBackend(default_gguf_f32, n_ctx=256, n_threads=1, load=LoadOptions(extra_bufts=False))
    try:
        return greedy_tokens(one, 16)
    finally:
        one.close()


def test_a_member_that_joins_is_placed_and_the_text_goes_on(tmp_path, default_gguf_f32, expected, capfd):
    """b is paired but away when the group forms; when it comes back, one look at the cluster
    places the group again over a and b, the context so far is fed again, and the text is the
    one device's."""
    a, b = AgentProc(tmp_path / "a", "a"), AgentProc(tmp_path / "b", "b")
    gb = None
    try:
        for x in (a, b):
            assert pair(x, tmp_path / "coord").returncode == 0
            x.line("serving the cluster")
        b.stop()
        me = Identity(tmp_path / "coord")
        listed = [a.address, b.address]
        infos = measure_peers(me, listed, require=False, unreachable=lambda *_: None)
        assert [i.name for i in infos] == ["a"]
        gb = GroupBackend(default_gguf_f32, me, [(a.address, 2)], n_ctx=256, extra_bufts=False)
        watch = MembershipWatch(gb, me, listed, infos, lambda members: [(i.address, 1) for i in members],
                                every_s=3600)  # looked at by hand below
        assert watch.check() is False                     # nothing changed yet

        def b_returns():
            nonlocal b
            b = AgentProc(tmp_path / "b", "b", port=b.port)
            b.line("serving the cluster")
            assert watch.check() is True

        assert greedy_tokens(gb, 16, at=8, then=b_returns) == expected
        assert gb.regroups == 1 and sorted(gb.placement) == sorted([(a.address, 1), (b.address, 1)])
        assert all(sent > 0 for sent, _ in gb.traffic().values())  # b carries its layer now
        assert "the cluster changed (joined: b): placed again on 2 member(s)" in capfd.readouterr().err
    finally:
        if gb is not None:
            gb.close()
        a.stop()
        b.stop()


def test_a_link_that_gets_worse_mid_generation_moves_the_layers_off_it(tmp_path, default_gguf_f32, expected, capfd):
    """b's link goes from ~0 to 60 ms round trips while its connections stay open (the shaper
    told so by a signal, as a device walking away): its heartbeats show it, one look at the
    cluster measures the links again, the split leaves b out, and the text goes on unchanged."""
    import signal
    import time

    a, b = AgentProc(tmp_path / "a", "a"), AgentProc(tmp_path / "b", "b")
    port = free_port()
    shaper = subprocess.Popen([sys.executable, str(LINKEMU), "--listen", f"127.0.0.1:{port}", "--target", b.address,
                               "--usr1-rtt-ms", "60"], stdout=subprocess.PIPE, text=True)
    gb = None
    try:
        assert "linkemu listening" in shaper.stdout.readline()
        for x in (a, b):
            assert pair(x, tmp_path / "coord").returncode == 0
            x.line("serving the cluster")
        me = Identity(tmp_path / "coord")
        listed = [a.address, f"127.0.0.1:{port}"]
        infos = measure_peers(me, listed)
        near = lambda members: [(i.address, 1) for i in members if i.link.rtt_s < 0.02]  # noqa: E731
        gb = GroupBackend(default_gguf_f32, me, near(infos), n_ctx=256, extra_bufts=False)
        watch = MembershipWatch(gb, me, listed, infos, near, every_s=3600)  # looked at by hand below

        def b_walks_away():
            assert watch.check() is False                 # heartbeats agree with the measured links
            shaper.send_signal(signal.SIGUSR1)
            assert "round trip now 60" in shaper.stdout.readline()
            time.sleep(3.5)                                # most of the last 16 heartbeats (0.25 s apart) are slow
            assert watch.check() is True

        assert greedy_tokens(gb, 16, at=8, then=b_walks_away) == expected
        assert gb.regroups == 1 and gb.placement == [(a.address, 1)]
        err = capfd.readouterr().err
        assert "the cluster changed (the link to b changed (RTT" in err and "placed again on 1 member(s)" in err
    finally:
        if gb is not None:
            gb.close()
        shaper.kill()
        a.stop()
        b.stop()
