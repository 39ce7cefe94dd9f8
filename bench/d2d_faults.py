"""Faults inside bench/d2d.py's topology: the far peer's llama.cpp RPC server killed (SIGKILL; its
agent lives on and starts a new one), and separately its link cut (the link shaper frozen:
no byte either way and no FIN, as a pulled cable or a peer out of radio range), both at token
``at`` of a greedy generation on a placement that uses the far peer. Each fault twice: without a
replan callback (the SDK's typed error, PeerLost, and how long after the fault it came) and with
the SDK's own (edge.sdk.group.load_group: the split placed again over the members left, the
prompt and the tokens so far fed again, the text finished). The bench process is the SDK's
process: that it reports at all is the "SDK alive" check. Called by bench/d2d.py."""

from __future__ import annotations

import signal
import time

import numpy as np
import psutil


def rpc_server_of(agent_pid: int) -> psutil.Process:
    """The llama.cpp RPC server the agent runs (edge.d2d.rpc_server, a child of the agent)."""
    for c in psutil.Process(agent_pid).children(recursive=True):
        if "edge.d2d.rpc_server" in " ".join(c.cmdline()):
            return c
    raise SystemExit(f"error: agent {agent_pid} runs no RPC server")


def listening(pid: int) -> bool:
    """Whether process ``pid`` has a listening TCP socket, read in its own network namespace
    (/proc/PID/net/tcp; psutil reads the caller's namespace, where a peer's sockets are not)."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    with open(f"/proc/{pid}/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[3] == "0A" and r[9] in inodes for r in rows)  # st 0A: LISTEN; field 9: inode


def run_with_fault(gguf, identity, placement, *, fault, heal, replan, prompt: list[int], tokens: int, at: int,
                   threads: int, n_ctx: int) -> dict:
    """Greedy tokens with ``fault()`` called before token ``at``; the outcome, the seconds from the
    fault to the typed error or to the next token, and the tokens made."""
    from edge.d2d.backend import GroupBackend, PeerLost

    be = GroupBackend(gguf, identity, placement, n_ctx=n_ctx, threads=threads, replan=replan)
    got: list[int] = []
    t_fault = None
    try:
        logits = be.eval(prompt)
        for i in range(tokens):
            if i == at:
                fault()
                t_fault = time.perf_counter()
            got.append(int(np.argmax(logits)))
            logits = be.eval([got[-1]])
            if i == at:
                after_s = time.perf_counter() - t_fault
        out = {"outcome": f"finished, placed again ({be.replans}x) on {be.placement}", "seconds": after_s}
    except PeerLost as e:
        out = {"outcome": f"PeerLost: {e}", "seconds": time.perf_counter() - t_fault}
    finally:
        be.close()
        heal()
    return out | {"tokens": got}


def fault_runs(gguf, identity, placement, replan, reference: list[int], *, far_agent_pid: int, far_link_pid: int,
               prompt: list[int], tokens: int, threads: int, n_ctx: int, at: int = 20, say=print) -> list[dict]:
    """The four fault runs on ``placement``; ``reference``: the greedy tokens of that placement
    without a fault."""

    def kill_rpc() -> None:
        rpc_server_of(far_agent_pid).kill()

    def wait_rpc() -> None:  # the agent starts a new RPC server; the next run needs it listening
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if listening(rpc_server_of(far_agent_pid).pid):
                    return
            except (SystemExit, psutil.Error, OSError):
                pass
            time.sleep(0.1)
        raise SystemExit("error: the far agent did not start a new RPC server within 30 s")

    def cut() -> None:
        psutil.Process(far_link_pid).send_signal(signal.SIGSTOP)

    def mend() -> None:
        psutil.Process(far_link_pid).send_signal(signal.SIGCONT)

    rows = []
    for fault_name, fault, heal in (("far RPC server killed", kill_rpc, wait_rpc), ("far link cut", cut, mend)):
        for mode, cb in (("no replan", None), ("replan (SDK)", replan)):
            say(f"fault: {fault_name}, {mode}")
            r = run_with_fault(gguf, identity, placement, fault=fault, heal=heal, replan=cb, prompt=prompt,
                               tokens=tokens, at=at, threads=threads, n_ctx=n_ctx)
            r |= {"fault": fault_name, "mode": mode, "same_text": r["tokens"] == reference[:len(r["tokens"])],
                  "made": len(r["tokens"])}
            rows.append(r)
    return rows


def fault_table(rows: list[dict], at: int) -> list[str]:
    lines = [f"faults at token {at} (placement using the far peer); the bench process is the SDK's",
             f"{'fault':22} {'mode':13} {'tokens':>6} {'text':>9} {'s after':>8}  outcome"]
    for r in rows:
        lines.append(f"{r['fault']:22} {r['mode']:13} {r['made']:6d} {'same' if r['same_text'] else 'DIFFERS':>9} "
                     f"{r['seconds']:8.2f}  {r['outcome'][:110]}")
    return lines
