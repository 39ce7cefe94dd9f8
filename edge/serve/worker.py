"""Admission and generation. A bounded queue in front of ``concurrency`` generation slots, each
holding its own loaded Model (one model computes one sequence at a time). Past the queue a request
is refused at once (the caller answers 429 with Retry-After) rather than waiting without bound. A
generation runs in a thread and hands its chunks to the event loop; its ``cancel`` event (set when
the client disconnects or the request times out) stops it before the next token."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from edge.errors import EdgeError


class Busy(Exception):
    """Every slot is generating and the queue is full."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy: every generation slot is taken and {retry_after}")
        self.retry_after = retry_after


class Admission:
    """``concurrency`` slots and a queue of ``queue_size``; gauges of both, read by the metrics."""

    def __init__(self, models: list, queue_size: int):
        self.free: asyncio.Queue = asyncio.Queue()
        for m in models:
            self.free.put_nowait(m)
        self.concurrency, self.queue_size = len(models), queue_size
        self.running = self.waiting = 0
        self.recent_seconds: list[float] = []  # the last requests' durations, for Retry-After

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the median recent request time."""
        if not self.recent_seconds:
            return 1
        s = sorted(self.recent_seconds)[len(self.recent_seconds) // 2]
        return max(1, round(s))

    async def acquire(self, timeout: float):
        if self.free.empty() and self.waiting >= self.queue_size:
            raise Busy(self.retry_after())
        self.waiting += 1
        try:
            model = await asyncio.wait_for(self.free.get(), timeout)
        finally:
            self.waiting -= 1
        self.running += 1
        return model

    def release(self, model, seconds: float) -> None:
        self.running -= 1
        self.recent_seconds = (self.recent_seconds + [seconds])[-32:]
        self.free.put_nowait(model)


async def stream_in_thread(produce: Callable[[], Iterator[dict[str, Any]]], cancel: threading.Event,
                           on_chunk: Callable[[dict[str, Any]], None],
                           on_done: Callable[[], None]) -> AsyncIterator[dict[str, Any]]:
    """Run ``produce()`` (the SDK's chunk generator, given ``cancel``) in a worker thread, yielding
    its chunks here as they come. When this iterator is closed early (the client went away) it sets
    ``cancel``: the SDK ends the generation before its next token and its last chunks (the
    finish, the token counts) still reach ``on_chunk``. ``on_done`` runs on the event loop once the
    thread has let go of the model, whatever happened. Errors reach the caller."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def work() -> None:
        try:
            for chunk in produce():
                on_chunk(chunk)
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except BaseException as e:  # handed over: the event loop side raises it
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)
            loop.call_soon_threadsafe(on_done)

    threading.Thread(target=work, name="edge-generate", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()  # a no-op once the generation has ended


class Clock:
    """A request's timings for the metrics: arrival, first token, each token after it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now


def check_budget_change(model, budget) -> dict[str, Any]:
    if model.backend_name != "offload":
        raise EdgeError(f"the {model.backend_name} backend cannot change its memory budget while it runs")
    return model.set_memory_budget(budget, reason="admin endpoint")
