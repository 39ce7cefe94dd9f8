"""Run a command inside a cgroup-v1 memory limit (root only): the benchmarks' memory cap.

The kernel charges the group's anonymous memory *and* its page cache, so a memory-mapped model
really loses cached pages under the cap; over the cap the process is OOM-killed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class MemoryCap:
    """``with MemoryCap(bytes) as cap: cap.run([...])`` — a fresh group, removed afterwards."""

    def __init__(self, limit_bytes: int | None, name: str | None = None):
        self.limit = limit_bytes
        self.path = ROOT / (name or f"edge-bench-{os.getpid()}-{time.monotonic_ns()}")

    def __enter__(self) -> "MemoryCap":
        if self.path.is_dir():  # a named group a killed earlier run left: emptied and made anew
            for pid in (self.path / "cgroup.procs").read_text().split():
                subprocess.run(["kill", "-9", pid], check=False)
            self.__exit__()
        self.path.mkdir()
        if self.limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        return self

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run argv with its whole process tree in the group; records peak usage and OOM kills."""
        return subprocess.run(argv, preexec_fn=self._enter, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv in the group (its children stay in it too)."""
        return subprocess.Popen(argv, preexec_fn=self._enter, **kw)

    def _enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    @property
    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    @property
    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def set_limit(self, limit_bytes: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
