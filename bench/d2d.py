"""D2D benchmark: one MoE GGUF across a coordinator and three peers on shaped links, placed by
edge's distance-aware plan against exo's memory-proportional placement, llama.cpp's own `--rpc`
split and one device — tokens/s side by side in one run, and a sweep of the far link's delay.

    sudo python bench/d2d.py                        # the whole run (~6 min on 2 cores; 40 s more to build its model)
    sudo python bench/d2d.py --delays 40 --runs 3   # one delay

Topology (one Linux machine, root): each peer is a real `edge peer serve` in a network namespace
of its own (bench/netns.py: veth to this namespace, its llama.cpp RPC server on the namespace's
own loopback) and a memory cgroup that sets the free memory it reports; the coordinator is this
process and its llama.cpp child, given a memory budget of ~3 layers (as `edge.load(...,
memory_budget=)` gives one). Every link is a userspace shaper
(bench/linkemu.py: per-direction delay, paced bandwidth; netem is not in this kernel):

    coordinator --0.5 ms-- p1, p2            (each holds ~3 layers)
    coordinator --40 ms, 20 Mbit/s-- far     (holds ~10 layers: the most free memory)

The model: random weights at a small MoE's shape (qwen3moe, 8 layers, 32 experts, top-4, hidden
1024, expert FFN 1024, vocab 4096; Q4_K_M by ggml's own quantizer, bench/moe_gguf.py), each
expert tensor over llama.cpp's 10 MiB hash threshold, so the RPC servers keep them by hash and
a weight crosses the far link once (a warm-up at full link speed sends them all first; the
timed runs exclude loading). All devices share this machine's two cores: only one computes at
a time in a decode step, so each runs at the speed it would alone.

Systems, each from the links and memory measured at that delay (edge.sdk.group.measure_peers):
edge's split (edge.d2d.split: least predicted time per token), exo's allocate_layers_
proportionally over free memory (edge.d2d.split.proportional_split), llama.cpp's own split over
the three RPC servers with every layer offloaded (what `--rpc ... -ngl 99` does: by each
server's reported free memory), the near peers only, and — for reference, over its budget —
the coordinator alone holding every layer. Per system: decode tokens/s (median of
``--runs``, each from an empty context), time to first token, the bytes each link carried per
token, edge's predicted tokens/s and whether every run's tokens equal the one device's. At 40 ms,
the faults of bench/d2d_faults.py (the far peer's RPC server killed, its link cut, at token 20).
``--report`` reprints the last run's tables. Last line: ``d2d_ratio=<edge / memory-only at 40 ms>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cgroup import MemoryCap, drop_caches  # noqa: E402
from netns import Host  # noqa: E402

EDGE = [sys.executable, "-m", "edge.cli"]
HERE = Path(__file__).resolve().parent
SHAPE = dict(arch="qwen3_moe", n_layers=8, hidden_size=1024, n_heads=8, n_kv_heads=2, head_dim=128, n_experts=32,
             top_k=4, expert_ffn_size=1024, vocab_size=4096, context_length=4096, rope_theta=1e6, rms_norm_eps=1e-6)
PROMPT = "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot ="
AGENT_PORT = 50600
NEAR_RTT_MS, FAR_MBIT = 0.5, 20.0
FAULT_DELAY_MS, FAULT_AT = 40.0, 20  # faults are injected on the far link's 40 ms setting, at token 20
PEERS = (("p1", 1, 3), ("p2", 2, 3), ("far", 3, 10))  # name, namespace index, layers its memory holds


class Proc:
    """A child whose stderr (or stdout) lines are kept and can be waited for."""

    def __init__(self, argv: list[str], env: dict | None = None, preexec=None, stream: str = "stderr"):
        kw = {stream: subprocess.PIPE}
        self.p = subprocess.Popen(argv, env=env, preexec_fn=preexec, text=True, **kw)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, args=(getattr(self.p, stream),), daemon=True).start()

    def _read(self, f) -> None:
        for line in f:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self.lines.append("")
            self._cv.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                if "" in self.lines or time.monotonic() > deadline:
                    raise SystemExit(f"error: {self.p.args[:6]}: no {pattern!r} within {timeout:.0f} s; "
                                     f"last lines: {''.join(self.lines[-4:])}")
                self._cv.wait(max(0.05, deadline - time.monotonic()))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)


class Link:
    """bench/linkemu.py from 127.0.0.1:port to a peer agent, restartable with another shape."""

    def __init__(self, port: int, target: str):
        self.port, self.target, self.proc = port, target, None

    def shape(self, rtt_ms: float, mbit: float) -> None:
        if self.proc:
            self.proc.stop()
        self.proc = Proc([sys.executable, str(HERE / "linkemu.py"), "--listen", f"127.0.0.1:{self.port}",
                          "--target", self.target, "--rtt-ms", str(rtt_ms), "--mbit", str(mbit)], stream="stdout")
        self.proc.wait_for("linkemu listening", 20)
        self.rtt_ms, self.mbit = rtt_ms, mbit

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_peer(root: Path, host: Host, name: str, coordinator_id: Path, link: Link, threads: int) -> tuple[Proc, MemoryCap]:
    """An agent in its namespace and cgroup, paired through its link, its profile measured."""
    cap = MemoryCap(4 << 30, name=f"edge-d2d-{name}").__enter__()
    env = os.environ | {"EDGE_CACHE_DIR": str(root / "hosts" / name / "cache")}
    argv = host.argv(EDGE + ["peer", "serve", "--host", host.address, "--port", str(AGENT_PORT), "--name", name,
                             "--threads", str(threads), "--no-advertise", "--profile",
                             "--identity", str(root / "hosts" / name / "id")])
    agent = Proc(argv, env=env, preexec=cap._enter)
    code = agent.wait_for(r"pairing code: (\S+)", 60).group(1)
    r = subprocess.run(EDGE + ["peers", "pair", link.address, "--code", code, "--identity", str(coordinator_id)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise SystemExit(f"error: pairing {name} failed: {r.stderr.strip()}")
    agent.wait_for("serving the cluster", 60)
    agent.wait_for("profile measured", 600)
    return agent, cap


def usage(cap: MemoryCap) -> int:
    return int((cap.path / "memory.usage_in_bytes").read_text())


def run_group(gguf: Path, identity, placement, *, runs: int, tokens: int, threads: int, n_ctx: int,
              prompt: list[int], llamacpp_split: bool = False) -> dict:
    """Decode ``tokens`` greedy tokens ``runs`` times (each from an empty context) on a placement."""
    import numpy as np

    from edge.d2d.backend import GroupBackend, PeerLost
    from edge.errors import EdgeError

    try:
        be = GroupBackend(gguf, identity, placement, n_ctx=n_ctx, threads=threads, llamacpp_split=llamacpp_split,
                          lost_after_s=3.0)
    except EdgeError as e:
        return {"error": str(e)}
    out = {"load_s": be.load_s, "tok_s": [], "ttft_s": [], "runs_tokens": [], "per_token_bytes": {}}
    try:
        for _ in range(runs):
            be.truncate(0)
            t0 = time.perf_counter()
            logits = be.eval(prompt)
            ttft = time.perf_counter() - t0
            before, waited0 = be.traffic(), be.relay.waited()
            got, t1 = [], time.perf_counter()
            for _ in range(tokens):
                t = int(np.argmax(logits))
                got.append(t)
                logits = be.eval([t])
            dt = time.perf_counter() - t1
            after = be.traffic()
            out["tok_s"].append(tokens / dt)
            out["ttft_s"].append(ttft)
            out["runs_tokens"].append(got)
            out["per_token_bytes"] = {p: ((after[p][0] - before[p][0]) / tokens, (after[p][1] - before[p][1]) / tokens)
                                      for p in after}
            waited = be.relay.waited()  # per member: from llama.cpp's last byte of a request to the first of its answer
            out.setdefault("waited_ms", []).append({p: (waited[p] - waited0[p]) / tokens * 1e3 for p in waited})
    except (PeerLost, EdgeError) as e:
        out["error"] = str(e)
    finally:
        be.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/edge-bench/d2d"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--delays", default="0,2,5,10,20,40,80", help="the far link's round-trip times to sweep, ms")
    ap.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True,
                    help=f"at {FAULT_DELAY_MS:g} ms, kill the far peer's RPC server and cut its link "
                         f"at token {FAULT_AT}")
    ap.add_argument("--report", action="store_true", help="print the tables of the last run (its d2d-results.json) and stop")
    args = ap.parse_args()
    if args.report:
        results = json.loads((args.root / "d2d-results.json").read_text())
        for delay, row in results["delays"].items():
            print("\n".join(table(float(delay), row)))
        if "faults" in results:
            from d2d_faults import fault_table

            print("\n".join(fault_table(results["faults"], FAULT_AT)))
        print("\n".join(summary(results)))
        return
    if os.geteuid() != 0:
        sys.exit("error: needs root (network namespaces, cgroups, drop_caches)")
    delays = [float(x) for x in args.delays.split(",")]
    args.root.mkdir(parents=True, exist_ok=True)

    from moe_gguf import write_model

    from edge.d2d.identity import Identity
    from edge.d2d.planning import WORKER_BASE_BYTES, gguf_layers, members
    from edge.d2d.split import predict, proportional_split, split_layers
    from edge.device.profile import cached_profile
    from edge.errors import EdgeError
    from edge.runtime.llamacpp import load_model
    from edge.runtime.tokenizer import LlamaCppTokenizer
    from edge.sdk.group import measure_peers, this_device

    gguf = args.root / "d2d-moe-q4_k_m.gguf"
    if not gguf.is_file():
        write_model(gguf, SHAPE, say=lambda *a, **k: print(*a, file=sys.stderr, **k))
    g = gguf_layers(gguf, args.ctx)
    prompt = LlamaCppTokenizer(load_model(gguf, vocab_only=True)).encode(PROMPT)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say(f"model: {gguf.name}, {gguf.stat().st_size / 2**20:.0f} MiB, {g.n_layers} layers of {g.layer_bytes / 2**20:.1f} "
        f"MiB; prompt {len(prompt)} tokens")
    cached_profile()  # this device measured before any peer runs
    coord_id = args.root / "coordinator"
    import shutil

    for old in [coord_id, *(args.root / "hosts").glob("*/id")]:  # a new cluster each run (tensor caches kept)
        shutil.rmtree(old, ignore_errors=True)
    for old in (args.root / "hosts").glob("*/cache/profile.json"):  # each device measures itself in this run
        old.unlink()
    hosts, links, agents, caps = {}, {}, {}, {}
    results: dict = {"delays": {}, "shape": SHAPE, "when": time.strftime("%Y-%m-%d %H:%M"),
                     "cpu": cached_profile().cpu_model}
    try:
        for name, idx, _ in PEERS:
            hosts[name] = Host(name, idx).__enter__()
            links[name] = Link(7100 + idx, f"{hosts[name].address}:{AGENT_PORT}")
            links[name].shape(NEAR_RTT_MS if name != "far" else 0.0, 0.0)
            agents[name], caps[name] = start_peer(args.root, hosts[name], name, coord_id, links[name], args.threads)
            say(f"{name}: serving in namespace {hosts[name].ns} at {hosts[name].address}, "
                f"through 127.0.0.1:{links[name].port}")
        identity = Identity(coord_id)

        def offer() -> None:
            """The free memory each peer reports: `holds` layers and half a layer's slack, set
            again before each delay (what earlier loads left in the page cache is dropped)."""
            drop_caches()
            for name, _, holds in PEERS:
                caps[name].set_limit(usage(caps[name]) + int((holds + 0.5) * g.layer_bytes))
        # the coordinator holds ~3 layers: its budget, as edge.load(..., memory_budget=) gives it
        coord_budget = WORKER_BASE_BYTES + g.coordinator_bytes + int(3.5 * g.layer_bytes)
        addresses = {name: links[name].address for name, _, _ in PEERS}
        by_address = {v: k for k, v in addresses.items()}
        common = dict(runs=args.runs, tokens=args.tokens, threads=args.threads, n_ctx=args.ctx, prompt=prompt)

        single = None
        for delay in delays:
            links["far"].shape(delay, FAR_MBIT)
            offer()
            infos = measure_peers(identity, list(addresses.values()))
            me = this_device(args.threads) | {"free_bytes": coord_budget}
            coordinator, remotes, costs = members(gguf, me, infos, args.ctx)
            named = {by_address[i.address]: i for i in infos}
            name_of = {i.name: by_address[i.address] for i in infos}
            near = [m for m in remotes if name_of[m.name] != "far"]
            plans = {}
            best = split_layers(coordinator, remotes, costs)
            plans["edge (distance-aware)"] = best.layers
            try:
                plans["near peers only"] = split_layers(coordinator, near, costs).layers
            except EdgeError as e:
                say(f"{delay:g} ms: near peers only: {e}")
            order = [coordinator, *sorted(remotes, key=lambda m: m.link.bytes_per_s)]
            plans["memory-only (exo)"] = proportional_split(order, costs.n_layers)
            row = {"links": {n: {"rtt_ms": i.link.rtt_s * 1e3, "mbit": i.link.bytes_per_s * 8 / 1e6,
                                 "free_mib": i.free_bytes / 2**20} for n, i in named.items()},
                   "coordinator_free_mib": coordinator.free_bytes / 2**20, "systems": {}, "reasons": best.reasons}
            def timed(placement, far_used: bool, llamacpp_split: bool = False) -> dict:
                if far_used:  # its weights to the far server's hash cache at full link speed, untimed
                    links["far"].shape(0.0, 0.0)
                    warm = run_group(gguf, identity, placement, llamacpp_split=llamacpp_split, **common | {"runs": 0})
                    links["far"].shape(delay, FAR_MBIT)
                    say(f"  warm-up load {warm.get('load_s', float('nan')):.1f} s {warm.get('error', '')}")
                return run_group(gguf, identity, placement, llamacpp_split=llamacpp_split, **common)

            done: dict[tuple, dict] = {}
            for system, layers in plans.items():
                placement = [(named[name_of[n]].address, k) for n, k in layers.items() if n != "this device" and k]
                key = tuple(sorted(layers.items()))
                if key not in done:
                    say(f"{delay:g} ms: {system}: {layers}")
                    done[key] = timed(placement, any(name_of.get(n) == "far" and k for n, k in layers.items()))
                compute, network = predict(coordinator, remotes, layers, costs)
                row["systems"][system] = done[key] | {"layers": {name_of.get(n, n): k for n, k in layers.items()},
                                                      "predicted_tok_s": 1 / (compute + network)}
            say(f"{delay:g} ms: llama.cpp's own --rpc split")
            row["systems"]["llama.cpp default --rpc"] = timed([(i.address, 0) for i in infos], True, True)
            if single is None:
                say("one device, all in memory (more than its budget)")
                single = run_group(gguf, identity, [], **common)
            row["systems"]["one device (no budget)"] = single
            results["delays"][str(delay)] = row
            print("\n".join(table(delay, row)), flush=True)
            if delay == FAULT_DELAY_MS and args.faults:
                results["faults"] = faults(gguf, identity, plans["memory-only (exo)"], done, named, name_of, me, infos,
                                           agents["far"].p.pid, links["far"].proc.p.pid, args, prompt, say)
    finally:
        for a in agents.values():
            a.stop()
        for link in links.values():
            if link.proc:
                link.proc.stop()
        for h in hosts.values():
            h.__exit__()
        for c in caps.values():
            c.__exit__()
    (args.root / "d2d-results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(summary(results)), flush=True)


def faults(gguf, identity, layers, done, named, name_of, me, infos, far_agent_pid, far_link_pid, args, prompt,
           say) -> list[dict]:
    """bench/d2d_faults.py on the memory-only placement (the one that uses the far peer), with the
    replan the SDK makes (edge.sdk.group.load_group: edge's split over the members left)."""
    from d2d_faults import fault_runs, fault_table

    from edge.d2d.planning import place

    placement = [(named[name_of[n]].address, k) for n, k in layers.items() if n != "this device" and k]
    reference = done[tuple(sorted(layers.items()))]["runs_tokens"][0]

    def replan(old, lost: list[str]):
        return place(gguf, me, [i for i in infos if i.address not in lost], args.ctx)[1]

    rows = fault_runs(gguf, identity, placement, replan, reference, far_agent_pid=far_agent_pid,
                      far_link_pid=far_link_pid, prompt=prompt, tokens=args.tokens, threads=args.threads,
                      n_ctx=args.ctx, at=FAULT_AT, say=say)
    print("\n".join(fault_table(rows, FAULT_AT)), flush=True)
    return rows


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(delay: float, row: dict) -> list[str]:
    links = ", ".join(f"{n} {v['rtt_ms']:.1f} ms {v['mbit']:.0f} Mbit/s {v['free_mib']:.0f} MiB free"
                      for n, v in row["links"].items())
    lines = [f"far link {delay:g} ms RTT: measured {links}; coordinator {row['coordinator_free_mib']:.0f} MiB free",
             f"{'system':28} {'layers':34} {'tok/s':>6} {'pred':>6} {'TTFT s':>7} {'text':>5}  KB/token per link (up/down)"]
    one = row["systems"].get("one device (no budget)", {}).get("runs_tokens", [None])[0]
    for name, r in row["systems"].items():
        if "error" in r and not r.get("tok_s"):
            lines.append(f"{name:28} failed: {r['error'][:120]}")
            continue
        layers = ", ".join(f"{n} {k}" for n, k in r.get("layers", {}).items()) or "-"
        pred = f"{r['predicted_tok_s']:6.1f}" if "predicted_tok_s" in r else "     -"
        wire = ", ".join(f"{up / 1e3:.1f}/{down / 1e3:.1f}" for up, down in r["per_token_bytes"].values()) or "-"
        same = "-" if one is None or not r.get("runs_tokens") else (
            "same" if all(t == one for t in r["runs_tokens"]) else "DIFF")  # every run's tokens against one device's
        lines.append(f"{name:28} {layers:34} {med(r['tok_s']):6.1f} {pred} {med(r['ttft_s']):7.2f} {same:>5}  {wire}"
                     + (f"  (error after runs: {r['error'][:60]})" if "error" in r else ""))
    return lines


def summary(results: dict) -> list[str]:
    out = ["", "delay sweep (far link RTT, ms): decode tok/s, median",
           f"{'delay':>6} {'edge':>6} {'memory':>7} {'near':>6} {'llama':>6} {'edge/mem':>9} {'edge/best':>10} {'pred err':>9}"]
    ratio40 = None
    for d, row in results["delays"].items():
        s = row["systems"]
        e, m, n = (med(s.get(k, {}).get("tok_s", [])) for k in ("edge (distance-aware)", "memory-only (exo)",
                                                                 "near peers only"))
        ll = med(s["llama.cpp default --rpc"].get("tok_s", []))
        pred = s["edge (distance-aware)"]["predicted_tok_s"]
        out.append(f"{float(d):6g} {e:6.1f} {m:7.1f} {n:6.1f} {ll:6.1f} {e / m:8.2f}x "
                   f"{e / max(x for x in (m, n) if x == x):9.2f}x "
                   f"{(pred - e) / e:+8.1%}")
        if float(d) == 40:
            ratio40 = e / m
    out.append(f"d2d_ratio={ratio40:.2f}" if ratio40 else "d2d_ratio=nan")
    return out


if __name__ == "__main__":
    main()
