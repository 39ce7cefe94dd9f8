"""Peer agents for the D2D tests: each a real `edge peer serve` process on loopback, its stderr
lines kept, paired with a coordinator identity through the real CLI."""

import contextlib
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

EDGE = [sys.executable, "-m", "edge.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProc:
    def __init__(self, folder: Path, name: str, profile: bool = False, extra: tuple[str, ...] = (),
                 port: int | None = None):
        self.port, self.name, self.folder = port or free_port(), name, folder
        self.proc = subprocess.Popen(EDGE + ["peer", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                             "--name", name, "--threads", "1", "--no-advertise",
                                             "--profile" if profile else "--no-profile",
                                             "--identity", str(folder), *extra],
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def line(self, pattern: str, timeout: float = 60) -> str:
        """The next stderr line matching ``pattern`` (bounded in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"agent {self.name} ended: {''.join(self.lines)[-500:]}")
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"agent {self.name}: no line matching {pattern!r} in {timeout} s: {self.lines[-5:]}")

    def wait_all(self, *patterns: str, timeout: float = 60) -> None:
        """Wait until a line matching each pattern has been seen, in any order."""
        deadline = time.monotonic() + timeout
        while not all(any(re.search(p, x) for x in self.lines) for p in patterns):
            with contextlib.suppress(AssertionError):
                self.line("|".join(patterns), timeout=max(0.1, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise AssertionError(f"agent {self.name}: not all of {patterns} in {timeout} s: {self.lines[-5:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


def pair(agent: AgentProc, coordinator: Path, code: str | None = None) -> subprocess.CompletedProcess:
    shown = re.search(r"pairing code: (\S+)", agent.line("pairing code")).group(1)
    return subprocess.run(EDGE + ["peers", "pair", agent.address, "--code", code or shown, "--identity", str(coordinator)],
                          capture_output=True, text=True, timeout=60)
