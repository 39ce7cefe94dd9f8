"""What one remote run costs this coordinator beyond its link, measured: the cost model's
``run_s`` (edge.d2d.split.ModelCosts).

A decode step across a group pays, for each member that runs layers, a round trip on its link
(measured per member: edge.d2d.client.measure_link) and the member's compute (its profile) — and
on the coordinator the work of handing a run over: llama.cpp's RPC client (the graph serialised,
inputs set, output read), the hop through edge's relay, threads woken for the coordinator's next
layers. On the d2d benchmark that was ~1.2 ms per remote run on this 2-core VM, 15-20% of a
token, which a model without it missed (docs/d2d.md).

The probe: the embedded default model (Q8_0) decoded by the group's own worker process
(edge.d2d.worker, with the group's OpenMP settings) once with every layer here and once with its
last two layers on a llama.cpp RPC server on loopback reached through an asyncio forwarder like
the relay's; the difference per token is one remote run's cost here (loopback's own round trip,
~0.1 ms, included). Median of 3 passes of 32 tokens each; cached a day in edge's cache folder.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from edge.errors import EdgeError

TTL_S = 24 * 3600
PROMPT = [272, 358, 621, 269]


class _Forwarder:
    """127.0.0.1:port -> target, both ways, in an asyncio loop of its own thread (as the relay runs)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="edge-d2d-probe", daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _open(self):
        return await asyncio.start_server(self._carry, "127.0.0.1", 0)

    async def _carry(self, reader, writer) -> None:
        from edge.d2d.agent import nodelay, splice

        up = await asyncio.open_connection("127.0.0.1", self.target_port)
        nodelay(writer, up[1])
        await splice((reader, writer), up)

    def close(self) -> None:
        async def shut():
            self.server.close()
            for t in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                t.cancel()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _per_token_s(gguf: str, rpc_layers: list, threads: int, passes: int = 3, tokens: int = 32) -> float:
    from edge._llamacpp import group_process_env
    from edge.d2d.worker import read_frame, write_frame

    proc = subprocess.Popen([sys.executable, "-m", "edge.d2d.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=group_process_env())
    try:
        write_frame(proc.stdin, json.dumps({"gguf": gguf, "rpc_layers": rpc_layers, "n_ctx": 256, "threads": threads,
                                            "extra_bufts": False}).encode())
        info = json.loads(read_frame(proc.stdout) or b'{"error": "the worker ended"}')
        if "error" in info:
            raise EdgeError(f"the remote-run probe could not load its model: {info['error']}")

        def ev(tokens: list[int]) -> np.ndarray:
            write_frame(proc.stdin, json.dumps({"eval": tokens}).encode())
            return np.frombuffer(read_frame(proc.stdout), dtype="<f4")

        times = []
        for _ in range(passes):
            write_frame(proc.stdin, b'{"truncate": 0}')
            read_frame(proc.stdout)
            logits = ev(PROMPT)
            t0 = time.perf_counter()
            for _ in range(tokens):
                logits = ev([int(np.argmax(logits))])
            times.append((time.perf_counter() - t0) / tokens)
        return statistics.median(times)
    finally:
        proc.kill()
        proc.wait()


def measure_remote_run_s(threads: int) -> float:
    """Seconds one remote run adds to a decode step on this device as coordinator (see above)."""
    from edge._llamacpp import group_process_env
    from edge.d2d.agent import free_port
    from edge.device.probes import default_q8_gguf

    gguf = str(default_q8_gguf())
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "edge.d2d.rpc_server", "--port", str(port), "--threads",
                               str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=group_process_env())
    fwd = None
    try:
        deadline = time.monotonic() + 30
        while True:  # listening?
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise EdgeError("the remote-run probe's llama.cpp RPC server did not start") from None
                time.sleep(0.05)
        fwd = _Forwarder(port)
        local = _per_token_s(gguf, [], threads)
        remote = _per_token_s(gguf, [[f"127.0.0.1:{fwd.port}", 2]], threads)
    finally:
        if fwd is not None:
            fwd.close()
        server.kill()
        server.wait()
    return max(0.0, remote - local)


def remote_run_s(threads: int) -> float:
    """:func:`measure_remote_run_s`, measured at most once a day per thread count."""
    from edge.paths import cache_dir

    path = cache_dir("d2d") / "remote-run.json"
    try:
        got = json.loads(path.read_text())
        if got["threads"] == threads and time.time() - got["measured_unix"] < TTL_S:
            return float(got["remote_run_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    s = measure_remote_run_s(threads)
    path.write_text(json.dumps({"remote_run_s": s, "threads": threads, "measured_unix": time.time()}))
    return s
