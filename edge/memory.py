"""How much memory this process holds, as a memory limit sees it.

A cgroup charges its processes' anonymous memory *and* the page cache they pulled in (code,
imported modules, files read), so inside a memory-limited cgroup the group's own usage is the
number a budget must be held against; elsewhere it is the process's resident set."""

from __future__ import annotations

from pathlib import Path

import psutil

_V1 = Path("/sys/fs/cgroup/memory")
_V2 = Path("/sys/fs/cgroup")


def cgroup_memory() -> tuple[int, int] | None:
    """(usage, limit) of this process's memory cgroup when it has a limit below physical RAM."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    total = psutil.virtual_memory().total
    for line in lines:
        _, controllers, path = line.split(":", 2)
        try:
            if "memory" in controllers.split(","):  # cgroup v1
                d = _V1 / path.lstrip("/")
                usage, limit = int((d / "memory.usage_in_bytes").read_text()), int((d / "memory.limit_in_bytes").read_text())
            elif controllers == "":  # cgroup v2 unified
                d = _V2 / path.lstrip("/")
                raw = (d / "memory.max").read_text().strip()
                if raw == "max":
                    continue
                usage, limit = int((d / "memory.current").read_text()), int(raw)
            else:
                continue
        except (OSError, ValueError):
            continue
        if limit < total:
            return usage, limit
    return None


def footprint_bytes() -> int:
    """Resident memory plus, inside a limited cgroup, the page cache charged to it."""
    rss = psutil.Process().memory_info().rss
    cg = cgroup_memory()
    return max(rss, cg[0]) if cg else rss
