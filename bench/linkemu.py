"""A network link in user space: forwards TCP connections from a local port to a target, each
direction delayed by half the round-trip time and paced to a bandwidth (netem is not in this
kernel, so the benchmarks shape their links here).

    python bench/linkemu.py --listen 127.0.0.1:7001 --target 10.213.3.2:50600 --rtt-ms 40 --mbit 20

A chunk read at time t leaves the link at  max(t, link busy until) + bytes / bandwidth  and arrives
rtt/2 later (plus a uniform jitter of up to --jitter-ms, never overtaking the chunk before it).
Every connection through the link shares its bandwidth each way, as on a real link. A direction
stops reading while more than ``--queue-s`` of data waits, so the sender feels TCP's own
back-pressure instead of an unbounded buffer. Runs until killed; prints one line when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket

CHUNK = 16384


class Direction:
    """One direction of the link: its delay, bandwidth and the time it is busy sending until
    (shared by every connection's pump in that direction)."""

    def __init__(self, delay_s: float, bytes_per_s: float | None, jitter_s: float, queue_s: float, rng: random.Random):
        self.delay_s, self.bytes_per_s, self.jitter_s, self.queue_s, self.rng = delay_s, bytes_per_s, jitter_s, queue_s, rng
        self.busy = 0.0

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue = asyncio.Queue()
        last_due = 0.0

        async def deliver() -> None:
            while True:
                due, data = await pending.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        out = asyncio.create_task(deliver())
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                now = loop.time()
                start = max(now, self.busy)
                self.busy = start + (len(data) / self.bytes_per_s if self.bytes_per_s else 0.0)
                jitter = self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
                last_due = max(last_due, self.busy + max(0.0, self.delay_s + jitter))
                pending.put_nowait((last_due, data))
                if not data:
                    break
                if self.busy - now > self.queue_s:
                    await asyncio.sleep(self.busy - now - self.queue_s)
            await out
        except (ConnectionError, OSError):
            pass
        finally:
            out.cancel()


async def serve(listen: tuple[str, int], target: tuple[str, int], rtt_s: float, bytes_per_s: float | None,
                jitter_s: float, queue_s: float, seed: int, usr1_rtt_s: float | None = None) -> None:
    rng = random.Random(seed)
    up = Direction(rtt_s / 2, bytes_per_s, jitter_s / 2, queue_s, rng)
    down = Direction(rtt_s / 2, bytes_per_s, jitter_s / 2, queue_s, rng)
    if usr1_rtt_s is not None:  # the link changes while its connections stay open (a device moving away)
        def change() -> None:
            up.delay_s = down.delay_s = usr1_rtt_s / 2
            print(f"linkemu: round trip now {usr1_rtt_s * 1e3:g} ms", flush=True)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, change)

    async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(*target)
        except OSError:
            w1.close()
            return
        for w in (w1, w2):
            s = w.get_extra_info("socket")
            if s is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(up.pump(r1, w2), down.pump(r2, w1), return_exceptions=True)
        for w in (w1, w2):
            w.close()

    server = await asyncio.start_server(handle, *listen)
    print(f"linkemu listening on {listen[0]}:{server.sockets[0].getsockname()[1]} -> {target[0]}:{target[1]}",
          flush=True)
    async with server:
        await server.serve_forever()


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=hostport, required=True)
    ap.add_argument("--target", type=hostport, required=True)
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added (half each way)")
    ap.add_argument("--mbit", type=float, default=0.0, help="bandwidth each way in Mbit/s (0: not paced)")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="the round trip varies by up to this much")
    ap.add_argument("--queue-s", type=float, default=0.25, help="at most this much data waits in the link")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--usr1-rtt-ms", type=float, default=None, help="on SIGUSR1 the round trip becomes this")
    a = ap.parse_args()
    asyncio.run(serve(a.listen, a.target, a.rtt_ms / 1e3, a.mbit * 1e6 / 8 if a.mbit else None, a.jitter_ms / 1e3,
                      a.queue_s, a.seed, None if a.usr1_rtt_ms is None else a.usr1_rtt_ms / 1e3))


if __name__ == "__main__":
    main()
