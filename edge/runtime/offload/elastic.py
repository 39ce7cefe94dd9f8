"""The elastic memory manager: follows the memory the device has right now.

A background thread reads, every ``interval`` seconds, how much memory is free for this process:
the system's available memory (psutil) and, inside a limited cgroup, the limit minus the group's
usage, whichever is smaller. Free memory below ``low`` means another app (or a lowered limit) is
squeezing us: the engine's budget drops so that free memory returns to the middle of
[``low``, ``high``]; above ``high`` the budget grows back the same way. The band between is the
hysteresis that keeps a steady device from resizing back and forth. The budget never leaves
[``floor``, ``ceiling``]. Every resize is logged and kept in the engine's telemetry.
"""

from __future__ import annotations

import logging
import threading

import psutil

from edge.errors import EdgeError
from edge.memory import cgroup_memory
from edge.runtime.offload.budget import set_memory_budget, smallest_budget
from edge.runtime.offload.engine import OffloadEngine
from edge.units import format_bytes

log = logging.getLogger(__name__)

LOW_BYTES = 96 << 20  # keep at least this much free: below it the kernel starts reclaiming hard
HIGH_BYTES = 256 << 20  # grow back only when this much is free


def free_bytes() -> int:
    """Memory this process could still take: system available, and the cgroup's room if limited."""
    free = psutil.virtual_memory().available
    cg = cgroup_memory()
    if cg:
        usage, limit = cg
        free = min(free, limit - usage)
    return free


class ElasticManager:
    """``with ElasticManager(engine): ...`` resizes ``engine`` in the background while it runs."""

    def __init__(self, engine: OffloadEngine, *, floor: int | None = None, ceiling: int | None = None,
                 low: int = LOW_BYTES, high: int = HIGH_BYTES, interval: float = 0.05):
        if engine.budget_bytes is None:
            raise EdgeError("the elastic memory manager needs a memory budget to start from (--memory-budget)")
        if not 0 <= low < high:
            raise EdgeError(f"elastic watermarks must satisfy 0 <= low < high, got {low:,} and {high:,}")
        self.engine = engine
        self.floor = max(floor or 0, smallest_budget(engine))
        self.ceiling = ceiling if ceiling is not None else engine.budget_bytes
        if self.floor > self.ceiling:
            raise EdgeError(f"elastic floor {format_bytes(self.floor)} is above the ceiling {format_bytes(self.ceiling)} "
                            f"(the smallest budget this model runs in is {format_bytes(smallest_budget(engine))})")
        self.low, self.high, self.interval = low, high, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> dict | None:
        """One look at free memory; resizes if it left the band. Returns the resize record or None."""
        free = free_bytes()
        budget = self.engine.budget_bytes
        middle = (self.low + self.high) // 2
        if free < self.low and budget > self.floor:
            target, why = max(self.floor, budget - (middle - free)), f"elastic: {format_bytes(free)} free < {format_bytes(self.low)}"
        elif free > self.high and budget < self.ceiling:
            target, why = min(self.ceiling, budget + (free - middle)), f"elastic: {format_bytes(free)} free > {format_bytes(self.high)}"
        else:
            return None
        try:
            return set_memory_budget(self.engine, int(target), reason=why)
        except EdgeError as e:  # cannot happen above the floor; kept so the thread never dies silently
            log.warning("elastic resize to %s refused: %s", format_bytes(int(target)), e)
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.step()

    def start(self) -> "ElasticManager":
        self._thread = threading.Thread(target=self._run, name="edge-elastic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "ElasticManager":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
