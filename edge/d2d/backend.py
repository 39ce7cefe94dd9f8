"""A model run across a group, as a backend of the shared generation loop (edge.runtime.generate):
llama.cpp in a supervised child process (edge.d2d.worker), its RPC traffic carried to the members
by the relay (edge.d2d.relay), which also watches every member with a heartbeat.

When a member dies or is cut off, llama.cpp would abort or hang; here the child is killed and the
call raises :class:`PeerLost` within ``lost_after_s`` + one poll, or, given a ``replan`` callback,
the group is placed again on the members left, the context (prompt and every token so far) fed
again, and the call finishes as if nothing happened, said once on stderr.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge._llamacpp import group_process_env
from edge.d2d.identity import Identity
from edge.d2d.relay import Relay
from edge.d2d.worker import read_frame, write_frame
from edge.errors import EdgeError

log = logging.getLogger(__name__)
POLL_S = 0.05


class PeerLost(EdgeError):
    """A member of the group stopped answering mid-generation; ``lost``: the addresses of the
    members lost or whose RPC server ended the session (empty when the child died alone)."""

    def __init__(self, message: str, lost: list[str]):
        super().__init__(message)
        self.lost = lost


Placement = list[tuple[str, int]]  # (peer agent host:port, layers), in running order


class GroupBackend:
    name = "d2d"

    def __init__(self, gguf: Path, identity: Identity, placement: Placement, *, n_ctx: int = 2048,
                 threads: int = 1, extra_bufts: bool | None = None, load_timeout_s: float = 600.0,
                 replan: Callable[[Placement, list[str]], Placement] | None = None,
                 heartbeat_s: float = 0.25, lost_after_s: float = 1.0, llamacpp_split: bool = False):
        """``llamacpp_split``: ignore the placement's layer counts and let llama.cpp split every
        layer over the members as its own ``--rpc`` does (the benchmark's baseline)."""
        self.gguf, self.identity = Path(gguf), identity
        self.llamacpp_split = llamacpp_split
        self.n_ctx_wanted, self.threads, self.extra_bufts = n_ctx, threads, extra_bufts
        self.load_timeout_s, self.replan = load_timeout_s, replan
        self.heartbeat_s, self.lost_after_s = heartbeat_s, lost_after_s
        self.history: list[int] = []
        self.n_past = 0
        self.replans = 0
        self.regroups = 0
        self._pending: tuple[Placement, str] | None = None
        self._lock = threading.Lock()
        self.on_close: list[Callable[[], None]] = []
        self._proc: subprocess.Popen | None = None
        self.relay: Relay | None = None
        self._start(placement)

    # -- the child and its tunnels --------------------------------------------------------------
    def _start(self, placement: Placement) -> None:
        self.placement = list(placement)
        self.relay = Relay(self.identity, [p for p, _ in self.placement], heartbeat_s=self.heartbeat_s,
                           lost_after_s=self.lost_after_s).__enter__()
        self._proc = subprocess.Popen([sys.executable, "-m", "edge.d2d.worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=group_process_env())
        rpc = [[t.endpoint, n] for t, (_, n) in zip(self.relay.tunnels, self.placement)]
        self._send(json.dumps({"gguf": str(self.gguf), "rpc_layers": rpc, "n_ctx": self.n_ctx_wanted,
                               "threads": self.threads, "extra_bufts": self.extra_bufts,
                               "default_split": self.llamacpp_split}).encode())
        info = json.loads(self._recv(self.load_timeout_s))
        if "error" in info:
            self._stop()
            raise EdgeError(info["error"])
        self.n_vocab, self.n_ctx, self.load_s = info["n_vocab"], info["n_ctx"], info["load_s"]

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self.relay is not None:
            self.relay.close()

    def _send(self, data: bytes) -> None:
        try:
            write_frame(self._proc.stdin, data)
        except (BrokenPipeError, OSError):
            self._fail("the group's llama.cpp process ended")

    def _recv(self, timeout_s: float) -> bytes:
        """The child's next frame, watching the members' heartbeats and the child itself meanwhile."""
        fd = self._proc.stdout
        deadline = time.monotonic() + timeout_s
        while True:
            lost = self.relay.lost()
            if lost:
                self._fail("; ".join(lost))
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if ready:
                frame = read_frame(fd)
                if frame is None:
                    time.sleep(POLL_S * 2)  # a heartbeat may be about to say which member it was
                    self._fail("; ".join(t.lost or t.ended for t in self.relay.failed())
                               or f"the group's llama.cpp process ended (exit {self._proc.poll()})")
                return frame
            if time.monotonic() > deadline:
                self._fail(f"the group did not answer within {timeout_s:.0f} s")

    def _fail(self, why: str):
        lost = [t.peer for t in self.relay.failed()] if self.relay else []
        self._stop()
        raise PeerLost(f"the group lost a member mid-generation: {why}", lost)

    # -- Backend -----------------------------------------------------------------------------------
    def _eval_once(self, tokens: Sequence[int]) -> np.ndarray:
        self._send(json.dumps({"eval": [int(t) for t in tokens]}).encode())
        return np.frombuffer(self._recv(self.load_timeout_s), dtype="<f4").copy()

    def regroup(self, placement: Placement, why: str) -> None:
        """Place the group again at the next eval (members joined or left: edge.sdk.group's watch);
        the context so far is fed to the new placement, so generation goes on where it was."""
        with self._lock:
            self._pending = (list(placement), why)

    def _apply_regroup(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or pending[0] == self.placement:
            return
        old = self.placement
        self._stop()
        try:
            self._start(pending[0])
        except EdgeError as e:
            print(f"warning: {pending[1]}, but the new placement failed ({e}); keeping the old one", file=sys.stderr)
            self._start(old)
        else:
            print(f"note: {pending[1]}: placed again on {len(self.placement)} member(s)", file=sys.stderr)
            self.regroups += 1
        if self.n_past:
            self._eval_once(self.history[:self.n_past])

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        if self._pending is not None:
            self._apply_regroup()
        if self.n_past + len(tokens) > self.n_ctx:
            raise EdgeError(f"context full: {self.n_past} + {len(tokens)} tokens exceed n_ctx {self.n_ctx}")
        del self.history[self.n_past:]
        self.history += [int(t) for t in tokens]
        try:
            logits = self._eval_once(tokens)
        except PeerLost as e:
            if self.replan is None:
                raise
            logits = self._recover(e)
        self.n_past = len(self.history)
        return logits

    def _recover(self, e: PeerLost) -> np.ndarray:
        # the members lost or whose RPC session ended; if none was (the child died alone), none is trusted
        lost_peers = e.lost or [p for p, _ in self.placement]
        placement = self.replan(self.placement, lost_peers)
        print(f"warning: {e}; placed again on {len(placement)} member(s) and feeding the {len(self.history)} "
              "tokens so far again", file=sys.stderr)
        self.replans += 1
        self._start(placement)
        return self._eval_once(self.history)

    def truncate(self, n: int) -> None:
        self.n_past = max(0, min(n, self.n_past))
        self._send(json.dumps({"truncate": self.n_past}).encode())
        self._recv(self.load_timeout_s)

    def traffic(self) -> dict[str, tuple[int, int]]:
        """Bytes sent to / received from each member since the group was (last) placed."""
        return self.relay.traffic() if self.relay else {}

    def metrics(self) -> dict:
        """Telemetry: memory of this process and the llama.cpp child, and per member the bytes each
        way, the request-reply turns and whether it was lost; how often the group was placed again."""
        import psutil

        rss = psutil.Process().memory_info().rss
        if self._proc is not None:
            try:
                rss += psutil.Process(self._proc.pid).memory_info().rss
            except psutil.Error:
                pass
        tunnels = self.relay.tunnels if self.relay else []
        return {"engine": self.name, "resident_bytes": rss, "replans": self.replans, "regroups": self.regroups,
                "load_s": self.load_s,
                "peers": [{"peer": t.peer, "layers": n, "sent_bytes": t.sent, "received_bytes": t.received,
                           "turns": t.turns, "lost": t.lost or t.ended} for t, (_, n) in zip(tunnels, self.placement)]}

    def link_rtts(self) -> dict[str, float]:
        """Each member's round trip as its heartbeats see it now (seconds; edge.d2d.relay)."""
        return self.relay.heartbeat_rtts() if self.relay else {}

    def turns(self) -> dict[str, int]:
        """Request-reply exchanges with each member since the group was (last) placed."""
        return self.relay.turns() if self.relay else {}

    def close(self) -> None:
        for hook in self.on_close:
            hook()
        self._stop()
