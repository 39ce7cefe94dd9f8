"""Peers on real sockets (loopback): pairing, admission by mutual TLS, link measurement, one model
run across a group through llama.cpp's RPC backend, and a member killed or frozen mid-generation.
Every agent is a real `edge peer serve` process."""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge.d2d.backend import GroupBackend, PeerLost
from edge.d2d.client import PeerUnreachable, hello, measure_link
from edge.d2d.identity import Identity
from edge.runtime.llamacpp import LlamaCppBackend, LoadOptions

from d2d_agents import EDGE, AgentProc, free_port, pair

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A coordinator identity and two paired peers."""
    root = tmp_path_factory.mktemp("cluster")
    agents = [AgentProc(root / f"p{i}", f"p{i}") for i in range(2)]
    try:
        for a in agents:
            r = pair(a, root / "coord")
            assert r.returncode == 0, r.stderr
            a.line("serving the cluster")
        yield Identity(root / "coord"), agents
    finally:
        for a in agents:
            a.stop()


def test_pairing_takes_the_code_shown_and_nothing_else(tmp_path):
    agent = AgentProc(tmp_path / "dev", "dev")
    try:
        wrong = pair(agent, tmp_path / "coord", code="AAAA-BBBB-CCCC-DDDD-EEEE")
        assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
        assert "refused pairing: wrong pairing code" in wrong.stderr
        assert not (tmp_path / "dev" / "node.pem").exists()           # still in no cluster
        agent.line("refused pairing from 127.0.0.1: wrong code")
        # the same code is still the one shown; pair with it now
        code = re.search(r"pairing code: (\S+)", next(x for x in agent.lines if "pairing code" in x)).group(1)
        ok = subprocess.run(EDGE + ["peers", "pair", agent.address, "--code", code, "--identity", str(tmp_path / "coord")],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and "paired: dev" in ok.stdout
        agent.line("serving the cluster")
        for key in (tmp_path / "dev" / "node.key", tmp_path / "coord" / "ca.key", tmp_path / "coord" / "node.key"):
            assert key.stat().st_mode & 0o077 == 0
        assert hello(Identity(tmp_path / "coord"), "127.0.0.1", agent.port)["member"] == "dev"
    finally:
        agent.stop()


def test_a_stranger_gets_nothing_past_the_handshake(cluster, tmp_path):
    me, (p0, _) = cluster
    stranger = Identity(tmp_path / "stranger")
    stranger.ensure_ca()                      # a cluster of its own
    with pytest.raises(PeerUnreachable, match="not a member of this cluster"):
        hello(stranger, "127.0.0.1", p0.port)
    # one that skips checking the peer and shows its own certificate: refused by the peer
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(str(stranger.cert_path), str(stranger.key_path))
    for client_ctx in (ctx, ssl._create_unverified_context()):   # with a foreign certificate; with none
        with socket.create_connection(("127.0.0.1", p0.port), timeout=5) as raw:
            try:
                with client_ctx.wrap_socket(raw) as s:
                    s.sendall(b'{"op": "hello"}\n')
                    assert s.recv(100) == b""      # closed, nothing answered
            except (ssl.SSLError, ConnectionResetError):
                pass
        p0.line("refused 127.0.0.1: not a member of this cluster", timeout=15)
    assert hello(me, "127.0.0.1", p0.port)["member"] == "p0"


def test_the_rpc_server_listens_on_loopback_only(cluster):
    _, agents = cluster
    for a in agents:
        listening = [c.laddr for child in psutil.Process(a.proc.pid).children(recursive=True)
                     for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_peers_lists_measured_links_and_memory(cluster):
    me, agents = cluster
    r = subprocess.run(EDGE + ["peers", "--json", "--identity", str(me.folder)] +
                       [x for a in agents for x in ("--peer", a.address)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["peer"] for x in rows] == ["p0", "p1"]
    for x in rows:
        assert 0 < x["rtt_ms"] < 50 and x["mbit_s"] > 10 and x["free_bytes"] > 1 << 28
    link = measure_link(me, "127.0.0.1", agents[0].port, rounds=5, nbytes=1 << 20)
    assert link.rtt_s > 0 and link.bytes_per_s > 1e6
    down = subprocess.run(EDGE + ["peers", "--peer", f"127.0.0.1:{free_port()}", "--identity", str(me.folder)],
                          capture_output=True, text=True, timeout=60)
    assert "unreachable" in down.stdout


def greedy(backend, n: int = 24, at=None) -> list[int]:
    logits, out = backend.eval([272, 358, 621, 269]), []
    for i in range(n):
        if at and i == 8:
            at()
        out.append(int(np.argmax(logits)))
        logits = backend.eval([out[-1]])
    return out


@pytest.fixture(scope="module")
def single_device(default_gguf_f32) -> list[int]:
    be = LlamaCppBackend(default_gguf_f32, n_ctx=256, n_threads=1, load=LoadOptions(extra_bufts=False))
    try:
        return greedy(be)
    finally:
        be.close()


def test_a_group_gives_the_single_device_output(cluster, default_gguf_f32, single_device):
    me, (p0, p1) = cluster
    gb = GroupBackend(default_gguf_f32, me, [(p0.address, 1), (p1.address, 1)], n_ctx=256, extra_bufts=False)
    try:
        assert greedy(gb) == single_device
        sent = gb.traffic()
        assert all(up > 100_000 and down > 1000 for up, down in sent.values()), sent   # weights out, activations back
    finally:
        gb.close()


def test_a_group_gives_the_single_device_output_at_q8_0(cluster, default_dir, tmp_path):
    """The same at Q8_0: quantized weights computed by the members' CPU backends."""
    from edge.formats.gguf_write import write_gguf
    from edge.formats.hf import load_weights

    gguf = tmp_path / "default-q8_0.gguf"
    write_gguf(load_weights(default_dir), default_dir / "tokenizer.json", gguf, outtype="q8_0", bos_id=0, eos_id=0)
    one = LlamaCppBackend(gguf, n_ctx=256, n_threads=1, load=LoadOptions(extra_bufts=False))
    try:
        expected = greedy(one)
    finally:
        one.close()
    me, (p0, p1) = cluster
    gb = GroupBackend(gguf, me, [(p0.address, 1), (p1.address, 2)], n_ctx=256, extra_bufts=False)
    try:
        assert greedy(gb) == expected
    finally:
        gb.close()


def test_a_killed_member_is_a_typed_error_within_2s(tmp_path, default_gguf_f32):
    root = tmp_path
    a = AgentProc(root / "k", "k")
    try:
        assert pair(a, root / "coord").returncode == 0
        a.line("serving the cluster")
        gb = GroupBackend(default_gguf_f32, Identity(root / "coord"), [(a.address, 2)], n_ctx=256, extra_bufts=False)
        t = {}
        with pytest.raises(PeerLost, match="went away|stopped answering") as e:
            greedy(gb, at=lambda: (os.kill(a.proc.pid, signal.SIGKILL), t.setdefault("t", time.monotonic())))
        assert time.monotonic() - t["t"] < 2.0 and e.value.lost
        gb.close()
    finally:
        a.stop()


def test_a_frozen_member_is_lost_within_2s_and_a_replan_finishes_the_text(cluster, tmp_path, default_gguf_f32,
                                                                          single_device, capfd):
    me, (p0, p1) = cluster
    gb = GroupBackend(default_gguf_f32, me, [(p0.address, 1), (p1.address, 1)], n_ctx=256, extra_bufts=False)
    t = {}
    with pytest.raises(PeerLost, match="stopped answering"):
        greedy(gb, at=lambda: (os.kill(p1.proc.pid, signal.SIGSTOP), t.setdefault("t", time.monotonic())))
    assert time.monotonic() - t["t"] < 2.0
    gb.close()
    # placing a group on a frozen member fails the same way instead of hanging
    with pytest.raises(PeerLost, match="stopped answering"):
        GroupBackend(default_gguf_f32, me, [(p0.address, 1), (p1.address, 1)], n_ctx=256, extra_bufts=False)
    os.kill(p1.proc.pid, signal.SIGCONT)
    # the same freeze with a replan onto the member left: the text comes out whole and the same
    gb = GroupBackend(default_gguf_f32, me, [(p0.address, 1), (p1.address, 1)], n_ctx=256, extra_bufts=False,
                      replan=lambda placement, lost: [(p, n) for p, n in placement if p not in lost])
    try:
        assert greedy(gb, at=lambda: os.kill(p1.proc.pid, signal.SIGSTOP)) == single_device
        assert gb.replans == 1 and gb.placement == [(p0.address, 1)]
        assert capfd.readouterr().err.count("placed again on 1 member") == 1
    finally:
        gb.close()
        os.kill(p1.proc.pid, signal.SIGCONT)


def rpc_server_of(agent: AgentProc) -> psutil.Process | None:
    return next((c for c in psutil.Process(agent.proc.pid).children(recursive=True)
                 if "edge.d2d.rpc_server" in " ".join(c.cmdline())), None)


def test_a_killed_rpc_server_names_its_member_and_a_replan_finishes_the_text(cluster, default_gguf_f32,
                                                                            single_device):
    """Only the member's llama.cpp RPC server dies (its agent lives on and starts a new one): the
    group's llama.cpp process aborts, the error names that member within 2 s, and a replan over
    the other member finishes the text unchanged."""
    me, (p0, p1) = cluster
    gb = GroupBackend(default_gguf_f32, me, [(p0.address, 1), (p1.address, 1)], n_ctx=256, extra_bufts=False)
    t = {}
    with pytest.raises(PeerLost, match=f"peer {p1.address} ended its RPC session") as e:
        greedy(gb, at=lambda: (rpc_server_of(p1).kill(), t.setdefault("t", time.monotonic())))
    assert time.monotonic() - t["t"] < 2.0 and e.value.lost == [p1.address]
    gb.close()
    p1.line("RPC server exited .* starting it again")
    gb = GroupBackend(default_gguf_f32, me, [(p0.address, 1), (p1.address, 1)], n_ctx=256, extra_bufts=False,
                      replan=lambda placement, lost: [(p, n) for p, n in placement if p not in lost])
    try:
        assert greedy(gb, at=lambda: rpc_server_of(p1).kill()) == single_device
        assert gb.replans == 1 and gb.placement == [(p0.address, 1)]
    finally:
        gb.close()
    p1.line("RPC server exited .* starting it again")
    deadline = time.monotonic() + 30  # the next tests use p1: its new RPC server listening
    while not ((server := rpc_server_of(p1)) and any(c.status == psutil.CONN_LISTEN
                                                      for c in server.net_connections())):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def profiled_cluster(tmp_path: Path, monkeypatch, prefix: str, agents: list) -> None:
    """Two paired agents (appended to ``agents`` as they start) whose profiles are this machine's,
    measured once into a shared edge cache that also holds the coordinator's identity."""
    import shutil

    from edge.device.profile import cached_profile

    shared = tmp_path / "cache"
    monkeypatch.setenv("EDGE_CACHE_DIR", str(shared))
    cached_profile()                                     # this machine, for coordinator and peers alike
    root = tmp_path / "ids"
    for i in range(2):
        a = AgentProc(root / f"{prefix}{i}", f"{prefix}{i}", profile=True)
        agents.append(a)
        assert pair(a, root / "coord").returncode == 0
        a.wait_all("serving the cluster", "profile measured")
    shutil.copytree(root / "coord", shared / "d2d")


def test_edge_load_across_peers_places_by_measurement_and_generates(tmp_path, monkeypatch, default_gguf_f32):
    """The SDK path: profiles measured (once, shared by the agents' cache), links measured, the
    split planned, the text the same as on one device."""

    import edge
    agents: list[AgentProc] = []
    try:
        profiled_cluster(tmp_path, monkeypatch, "q", agents)
        addresses = [a.address for a in agents]
        with edge.load(default_gguf_f32, peers=addresses, n_ctx=256) as m:   # this device holds it all: no peer used
            assert m.backend_name == "d2d" and m.metrics()["peers"] == []
            assert sum("left out" in n for n in m.notes) == 2
        # a budget this device holds one layer in (the group's process, the embeddings, one 3.4 MB layer)
        from edge.d2d.planning import WORKER_BASE_BYTES

        budget = psutil.Process().memory_info().rss + WORKER_BASE_BYTES + (4 << 20) + (5 << 20)
        with edge.load(default_gguf_f32, peers=addresses, n_ctx=256, memory_budget=budget) as m:
            assert any(n.startswith("run across") for n in m.notes) and any("(coordinator): 1 layers" in n for n in m.notes)
            text = m.create_completion("def fibonacci(", max_tokens=12, temperature=0)["choices"][0]["text"]
            used = m.metrics()["peers"]
            assert sum(p["layers"] for p in used) == 3
            assert all(p["sent_bytes"] > 0 and p["turns"] >= 12 and p["lost"] is None for p in used)
            # what edge serve's /metrics says of the group, read back as the monitor reads it
            from prometheus_client import CollectorRegistry, generate_latest

            from edge.monitor.source import parse
            from edge.serve.metrics import EngineCollector

            reg = CollectorRegistry()
            reg.register(EngineCollector([m]))
            seen = parse(generate_latest(reg).decode()).peers
            assert {p: x["layers"] for p, x in seen.items()} == {p["peer"]: p["layers"] for p in used}
            assert all(x["sent"] > 0 and x["received"] > 0 and x["lost"] == 0 for x in seen.values())
        with edge.load(default_gguf_f32, backend="llamacpp", n_ctx=256) as one:
            assert text == one.create_completion("def fibonacci(", max_tokens=12, temperature=0)["choices"][0]["text"]
    finally:
        for a in agents:
            a.stop()


def test_deploy_across_peers_writes_a_group_plan_that_run_follows(tmp_path, monkeypatch, default_gguf_f32):
    """edge deploy --peers: the members measured before anything is written (an unreachable one is
    exit 2 and no bundle), a gguf bundle with a d2d plan.json, a smoke run across the group; edge
    run on the bundle follows the plan, placing again on fresh measurements (a member gone since
    is left out, said once)."""

    agents: list[AgentProc] = []
    try:
        profiled_cluster(tmp_path, monkeypatch, "d", agents)
        gone = f"127.0.0.1:{free_port()}"
        bad = subprocess.run(EDGE + ["deploy", str(default_gguf_f32), "-o", str(tmp_path / "nope"), "--peers", gone],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and gone in bad.stderr, bad.stderr
        assert not (tmp_path / "nope").exists()
        addresses = ",".join(a.address for a in agents)
        out = tmp_path / "group"
        r = subprocess.run(EDGE + ["deploy", str(default_gguf_f32), "-o", str(out), "--peers", addresses, "--context", "256"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        plan = json.loads((out / "plan.json").read_text())
        assert plan["backend"] == "d2d" and plan["peers"] == [a.address for a in agents] and plan["context"] == 256
        assert plan["predicted_decode_tok_s"] > 0 and any("this device (coordinator)" in x for x in plan["reasons"])
        assert "smoke run decode" in r.stdout and "peers" in r.stdout
        agents[1].stop()
        run = subprocess.run(EDGE + ["run", "def fibonacci(", "-m", str(out), "--max-tokens", "8", "--temperature", "0"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "following plan.json" in run.stderr and "across 2 peer(s)" in run.stderr
        assert run.stderr.count(f"{agents[1].address} unreachable") == 1
        one = subprocess.run(EDGE + ["run", "def fibonacci(", "-m", str(default_gguf_f32), "--backend", "llamacpp",
                                     "--max-tokens", "8", "--temperature", "0"], capture_output=True, text=True, timeout=300)
        assert run.stdout == one.stdout
    finally:
        for a in agents:
            a.stop()
