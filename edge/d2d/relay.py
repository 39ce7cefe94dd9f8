"""The coordinator's end of the RPC tunnels: for each admitted peer, a listener on 127.0.0.1 that
llama.cpp's RPC client connects to, each connection carried to the peer inside a mutually
authenticated TLS channel (``rpc`` op of edge.d2d.agent) and on to the peer's loopback RPC
server. Counts the bytes each way per peer: what the cross-device traffic really is.

Runs its own asyncio loop in a thread, so it outlives the process it serves: generation runs in a
child process (llama.cpp aborts the process whose RPC peer dies), the relay stays with the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edge.d2d.agent import nodelay, pipe
from edge.d2d.identity import Identity
from edge.d2d.wire import MAX_LINE, read_msg, write_msg
from edge.errors import EdgeError

log = logging.getLogger(__name__)


@dataclass
class Tunnel:
    peer: str                 # host:port of the peer agent
    local_port: int
    sent: int = 0             # coordinator -> peer bytes
    received: int = 0         # peer -> coordinator bytes
    turns: int = 0            # exchanges: coordinator -> peer bytes after peer -> coordinator ones
    waited_s: float = 0.0     # seconds from the last byte of each request to the first of its answer
    _last_up: bool = False
    _up_at: float = 0.0
    connections: int = 0
    broken: str | None = None  # why the last connection to the peer failed, if it did
    lost: str | None = None    # why the heartbeat declared the peer gone, once it has
    ended: str | None = None   # why the peer ended an RPC session llama.cpp still held, if it did
    beats: deque = field(default_factory=lambda: deque(maxlen=16))  # the last heartbeats' round trips, s

    def up(self, n: int) -> None:
        self.sent += n
        if not self._last_up:
            self.turns += 1
        self._last_up = True
        self._up_at = time.perf_counter()

    def down(self, n: int) -> None:
        self.received += n
        if self._last_up:  # the answer's first bytes: the wait is the peer's compute plus the link
            self.waited_s += time.perf_counter() - self._up_at
        self._last_up = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.local_port}"


class Relay:
    """``with Relay(identity, ["10.0.0.2:50600", ...]) as r: r.tunnels[i].endpoint``"""

    def __init__(self, identity: Identity, peers: list[str], timeout: float = 5.0,
                 heartbeat_s: float = 0.25, lost_after_s: float = 1.0):
        self.identity, self.timeout = identity, timeout
        self.heartbeat_s, self.lost_after_s = heartbeat_s, lost_after_s
        self.tunnels = [Tunnel(p, 0) for p in peers]
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge-d2d-relay", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        fut.result(timeout=10)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def _open(self) -> None:
        for t in self.tunnels:
            server = await asyncio.start_server(lambda r, w, t=t: self._carry(t, r, w), "127.0.0.1", 0)
            t.local_port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
            self._tasks.append(asyncio.ensure_future(self._heartbeat(t)))  # held: the loop keeps weak refs

    async def _heartbeat(self, t: Tunnel) -> None:
        """A line echoed every ``heartbeat_s`` on a channel of its own: a peer that does not answer
        within ``lost_after_s`` (killed, frozen or cut off, where TCP alone would wait minutes) is lost."""
        host, _, port = t.peer.rpartition(":")
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port), ssl=self.identity.client_context(),
                                                                  server_hostname=None), self.timeout)
            await write_msg(w, {"op": "echo"})
            await asyncio.wait_for(read_msg(r), self.timeout)
            nodelay(w)
            i = 0
            while True:
                i += 1
                sent = time.perf_counter()
                w.write(b"%d\n" % i)
                await w.drain()
                if await asyncio.wait_for(r.readline(), self.lost_after_s) != b"%d\n" % i:
                    raise ConnectionError("the channel closed")
                t.beats.append(time.perf_counter() - sent)
                await asyncio.sleep(self.heartbeat_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            t.lost = f"peer {t.peer} stopped answering (no heartbeat reply within {self.lost_after_s:.1f} s)"
        except (OSError, EdgeError) as e:
            t.lost = f"peer {t.peer} went away ({e or type(e).__name__})"
        log.warning("%s", t.lost)

    def lost(self) -> list[str]:
        """Why each lost peer is lost."""
        return [t.lost for t in self.tunnels if t.lost]

    def heartbeat_rtts(self, least: int = 8) -> dict[str, float]:
        """Median round trip of each peer's last heartbeats (seconds), where at least ``least``
        were heard since the group was placed: the link as it is now."""
        import statistics

        return {t.peer: statistics.median(t.beats) for t in self.tunnels if len(t.beats) >= least}

    def failed(self) -> list[Tunnel]:
        """The tunnels whose peer is lost or ended a session llama.cpp still held."""
        return [t for t in self.tunnels if t.lost or t.ended]

    async def _carry(self, t: Tunnel, reader, writer) -> None:
        host, _, port = t.peer.rpartition(":")
        t.connections += 1
        try:
            pr, pw = await asyncio.wait_for(asyncio.open_connection(host, int(port), limit=MAX_LINE,
                                                                     ssl=self.identity.client_context(),
                                                                     server_hostname=None), self.timeout)
            await write_msg(pw, {"op": "rpc"})
            reply = await asyncio.wait_for(read_msg(pr), self.timeout)
            if not reply.get("ok"):
                raise EdgeError(reply.get("error", "refused"))
        except (TimeoutError, OSError, EdgeError) as e:
            t.broken = f"{t.peer}: {e or type(e).__name__}"
            log.warning("RPC tunnel to %s failed: %s", t.peer, t.broken)
            writer.close()
            return
        nodelay(pw, writer)  # RPC is many small messages
        first: list[str] = []  # which side's stream ended first
        up = asyncio.ensure_future(pipe(reader, pw, t.up))
        down = asyncio.ensure_future(pipe(pr, writer, t.down))
        up.add_done_callback(lambda _: first.append("coordinator"))
        down.add_done_callback(lambda _: first.append("peer"))
        try:
            await asyncio.gather(up, down)
            if first[0] == "peer":
                # the member ended a session llama.cpp still held: its RPC server stopped (the agent
                # starts a new one) or its side of the link went down
                t.ended = f"peer {t.peer} ended its RPC session (its llama.cpp RPC server stopped)"
                log.warning("%s", t.ended)
        except asyncio.CancelledError:  # the relay is closing
            up.cancel()
            down.cancel()
            writer.close()
            pw.close()

    def traffic(self) -> dict[str, tuple[int, int]]:
        """Bytes sent to and received from each peer so far."""
        return {t.peer: (t.sent, t.received) for t in self.tunnels}

    def waited(self) -> dict[str, float]:
        """Seconds llama.cpp has waited on each peer so far (its layers' compute, its link and
        every forwarder between), as the relay sees it."""
        return {t.peer: t.waited_s for t in self.tunnels}

    def turns(self) -> dict[str, int]:
        """Request-reply exchanges with each peer so far (round trips llama.cpp waited on, at most)."""
        return {t.peer: t.turns for t in self.tunnels}

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shut():
            for s in self._servers:
                s.close()
            for _ in range(3):  # a connection accepted just before the close starts its task after the first round
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
