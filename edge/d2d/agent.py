"""The peer agent, ``edge peer serve``: what a device runs to lend its CPU and memory to a group.

Unpaired, it shows a pairing code and answers pairing only (edge.d2d.pairing). Paired, it:

* runs llama.cpp's RPC server in a child process bound to 127.0.0.1 (edge.d2d.rpc_server),
  restarted if it dies;
* listens on the network with mutual TLS (edge.d2d.identity): a connection without a certificate
  of the cluster's CA is refused in the handshake and logged; nothing else gets in;
* answers the control channel (edge.d2d.wire: one JSON object per line): ``hello`` (name, free
  memory, threads, its measured profile), ``echo`` (round trips, for RTT), ``sink`` / ``source``
  (bulk bytes, for throughput), ``measure`` (its own link to another member), and ``rpc``, which
  turns the connection into a pipe to its loopback RPC port: RPC bytes flow only inside the
  authenticated, encrypted channel;
* advertises itself by mDNS/DNS-SD (zeroconf) as ``_edge-peer._tcp``, unless told not to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import time

import psutil

from edge._llamacpp import group_process_env
from edge.d2d.identity import Identity, peer_name
from edge.d2d.pairing import PairingError, WrongCodeError, device_answer, new_code
from edge.d2d.wire import MAX_LINE, WireError, read_msg, write_msg
from edge.errors import EdgeError

log = logging.getLogger(__name__)

DEFAULT_PORT = 50600
SERVICE = "_edge-peer._tcp.local."
MAX_BULK = 64 << 20
MAX_WRONG_CODES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_now() -> dict:
    """Free and total memory now, this process's memory cgroup limit applied (what llama.cpp's RPC
    server may allocate here)."""
    from edge.memory import cgroup_memory

    vm = psutil.virtual_memory()
    free, total = vm.available, vm.total
    cg = cgroup_memory()
    if cg:
        usage, limit = cg
        total, free = limit, min(free, limit - usage)
    return {"free_bytes": int(free), "total_bytes": int(total)}


def nodelay(*writers: asyncio.StreamWriter) -> None:
    """TCP_NODELAY on the sockets under these streams: llama.cpp's RPC is many small messages."""
    for w in writers:
        sock = w.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen=None) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            if seen is not None:
                seen(len(chunk))
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def splice(a: tuple, b: tuple, seen_ab=None, seen_ba=None) -> None:
    """Copy a's reader to b's writer and b's reader to a's writer until both ends close;
    ``seen_ab(n)`` / ``seen_ba(n)`` hear of every chunk that went each way."""
    await asyncio.gather(pipe(a[0], b[1], seen_ab), pipe(b[0], a[1], seen_ba))


class _Unread(asyncio.Protocol):
    """A new connection, not read from until its TLS handshake starts: bytes a plain stream reader
    took first (the client's hello) would be lost to TLS."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def connection_made(self, transport: asyncio.Transport) -> None:
        transport.pause_reading()
        self.agent.spawn(self.agent._admit(transport))


class _TLSStream(asyncio.StreamReaderProtocol):
    """A stream protocol under TLS: at end of input it closes (TLS has no half-close to keep)."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


class Agent:
    def __init__(self, identity: Identity, *, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                 name: str | None = None, threads: int | None = None, advertise: bool = True,
                 profile: dict | None = None, measure_profile: bool = True, anchor: bool = False, say=print):
        self.identity, self.host, self.port = identity, host, port
        self.anchor = anchor  # this device coordinates a group of its own (edge.d2d.shard's anchors)
        self.name = name or socket.gethostname()
        self.threads = threads or max(1, len(os.sched_getaffinity(0)))
        self.advertise, self.profile, self.say = advertise, profile or {}, say
        self.measure_profile = measure_profile
        self.rpc_port: int | None = None
        self._rpc: asyncio.subprocess.Process | None = None
        self.paired = asyncio.Event()
        self.ready = asyncio.Event()
        self.refused = 0
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        """A task the agent holds until it ends (the event loop keeps only weak references)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- pairing ---------------------------------------------------------------------------------
    async def _pair(self) -> None:
        code, wrong = new_code(), 0
        cert_pem = self.identity.self_signed_pem()
        cert_file = self.identity.folder / "pairing.pem"
        cert_file.write_bytes(cert_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(cert_file), str(self.identity.key_path))
        der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
        self.say(f"pairing code: {code}   (on the coordinator: edge peers pair {self.name_for_humans()}:{self.port} "
                 f"--code {code})")

        async def handle(reader, writer):
            nonlocal code, wrong
            addr = writer.get_extra_info("peername")
            try:
                req = await asyncio.wait_for(read_msg(reader), 30)
                if req.get("op") != "pair":
                    raise PairingError(f"this device is not paired yet; it answers pairing only (asked {req.get('op')!r})")
                reply, _ = device_answer(self.identity, code, der, req, self.name)
                await write_msg(writer, reply)
                got = await asyncio.wait_for(read_msg(reader), 30)
                self.identity.store_membership(str(got.get("cert", "")).encode(), req["ca"].encode())
                await write_msg(writer, {"ok": True, "name": self.name})
                self.say(f"paired with the coordinator at {addr[0]}: this device is {self.name} in its cluster")
                self.paired.set()
            except (TimeoutError, PairingError, WireError, EdgeError) as e:
                if isinstance(e, WrongCodeError):
                    wrong += 1
                    log.warning("refused pairing from %s: wrong code (%d of %d)", addr[0], wrong, MAX_WRONG_CODES)
                    if wrong >= MAX_WRONG_CODES:
                        code, wrong = new_code(), 0
                        self.say(f"{MAX_WRONG_CODES} wrong codes: new pairing code {code}")
                else:
                    log.warning("refused pairing from %s: %s", addr[0], e)
                with contextlib.suppress(Exception):
                    await write_msg(writer, {"error": str(e)})
            except (ConnectionError, ssl.SSLError, OSError) as e:
                log.warning("pairing connection from %s failed: %s", addr[0], e)
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        server = await asyncio.start_server(handle, self.host, self.port, ssl=ctx, limit=MAX_LINE)
        try:
            await self.paired.wait()
        finally:
            server.close()
            await server.wait_closed()
            cert_file.unlink(missing_ok=True)

    def name_for_humans(self) -> str:
        return self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()

    async def _measure_profile(self) -> None:
        """This device's profile (edge profile, cached a day), measured off the event loop; hello
        answers with {} until it is there. Only what placing layers needs is sent."""
        from edge.device.profile import cached_profile

        try:
            p = await asyncio.get_running_loop().run_in_executor(None, cached_profile)
        except EdgeError as e:
            log.warning("this device's profile could not be measured (%s): coordinators cannot place layers here", e)
            return
        self.profile = {k: getattr(p, k) for k in ("cpu_model", "cores_physical", "memory_bandwidth_gbps",
                                                   "gemv_q4_gflops", "llama_stream_gbps", "llama_layer_us",
                                                   "measured_unix")}
        from edge.d2d.planning import stream_gbps

        self.say(f"{self.name}: profile measured (llama.cpp streams {stream_gbps(self.profile) or 0:.1f} GB/s, "
                 f"{p.llama_layer_us or 0:.0f} us per layer)")

    # -- llama.cpp's RPC server --------------------------------------------------------------------
    async def _start_rpc(self) -> None:
        self.rpc_port = free_port()
        from edge.paths import cache_dir

        self._rpc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge.d2d.rpc_server", "--port", str(self.rpc_port), "--threads", str(self.threads),
            "--cache-dir", str(cache_dir("rpc-tensors")), env=group_process_env(),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._rpc.returncode is not None:
                raise EdgeError(f"llama.cpp's RPC server exited at start (code {self._rpc.returncode})")
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", self.rpc_port)
                w.close()
                return
            await asyncio.sleep(0.05)
        raise EdgeError("llama.cpp's RPC server did not start listening within 30 s")

    async def _watch_rpc(self) -> None:
        while True:
            code = await self._rpc.wait()
            log.warning("llama.cpp's RPC server exited (code %s); starting it again", code)
            await self._start_rpc()

    # -- the member channel ----------------------------------------------------------------------
    async def _member(self, reader, writer) -> None:
        addr = writer.get_extra_info("peername")
        who = peer_name(writer.get_extra_info("ssl_object"))
        try:
            req = await asyncio.wait_for(read_msg(reader), 30)
            await self._answer(req, reader, writer, who)
        except (TimeoutError, WireError, ConnectionError, ssl.SSLError, OSError) as e:
            log.info("connection from %s (%s) ended: %s", who, addr[0], e)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _admit(self, transport: asyncio.Transport) -> None:
        """The TLS handshake of one connection, done here rather than by start_server(ssl=...) so a
        refused client is counted and logged (asyncio keeps handshake failures to its debug log)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        proto = _TLSStream(reader)
        addr = transport.get_extra_info("peername") or ("?",)
        try:
            tls = await loop.start_tls(transport, proto, self.identity.server_context(), server_side=True,
                                       ssl_handshake_timeout=10)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as e:
            self.refused += 1
            log.warning("refused %s: not a member of this cluster (%s)", addr[0],
                        getattr(e, "reason", None) or type(e).__name__)
            transport.close()
            return
        await self._member(reader, asyncio.StreamWriter(tls, proto, reader, loop))

    async def _answer(self, req: dict, reader, writer, who: str) -> None:
        op = req.get("op")
        if op == "hello":
            await write_msg(writer, {"name": self.name, "threads": self.threads, "profile": self.profile,
                                     "rpc": self.rpc_port is not None, "anchor": self.anchor, "port": self.port,
                                     "host": self.host if self.host not in ("0.0.0.0", "::", "") else None,
                                     **memory_now()})
        elif op == "echo":
            await write_msg(writer, {"ok": True})
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        elif op == "sink":
            n = int(req.get("bytes", 0))
            if not 0 < n <= MAX_BULK:
                raise WireError(f"sink takes 1..{MAX_BULK} bytes")
            await reader.readexactly(n)
            await write_msg(writer, {"ok": True})
        elif op == "source":
            n = int(req.get("bytes", 0))
            if not 0 < n <= MAX_BULK:
                raise WireError(f"source takes 1..{MAX_BULK} bytes")
            block = os.urandom(1 << 16)
            for i in range(0, n, len(block)):
                writer.write(block[: min(len(block), n - i)])
                await writer.drain()
        elif op == "measure":
            from edge.d2d.client import measure_link

            try:
                rounds, nbytes = int(req.get("rounds", 10)), int(req.get("bytes", 1 << 20))
                link = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: measure_link(self.identity, str(req["host"]), int(req["port"]),
                                               rounds=rounds, nbytes=nbytes))
            except EdgeError as e:  # that member is not reachable from here
                await write_msg(writer, {"error": str(e)})
                return
            await write_msg(writer, {"rtt_s": link.rtt_s, "bytes_per_s": link.bytes_per_s})
        elif op == "rpc":
            try:
                rpc = await asyncio.open_connection("127.0.0.1", self.rpc_port)
            except OSError as e:
                await write_msg(writer, {"error": f"the RPC server is not running ({e})"})
                return
            await write_msg(writer, {"ok": True})
            nodelay(writer, rpc[1])
            log.info("RPC session for %s", who)
            await splice((reader, writer), rpc)
        else:
            await write_msg(writer, {"error": f"unknown op {op!r}"})

    async def _advertise(self):
        from zeroconf import ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        addresses = [socket.inet_aton(a.address) for addrs in psutil.net_if_addrs().values() for a in addrs
                     if a.family == socket.AF_INET and not a.address.startswith("127.")]
        info = ServiceInfo(SERVICE, f"{self.name}.{SERVICE}", port=self.port, addresses=addresses or None,
                           properties={"name": self.name, "cluster": self.identity.cluster_id()})
        zc = AsyncZeroconf()
        await zc.async_register_service(info)
        return zc, info

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        if not self.identity.paired:
            pairing = asyncio.ensure_future(self._pair())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({pairing, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not pairing.done():
                pairing.cancel()
                return
            stopping.cancel()
            pairing.result()
        self.paired.set()
        if self.measure_profile and not self.profile:
            self.spawn(self._measure_profile())
        await self._start_rpc()
        watch = asyncio.ensure_future(self._watch_rpc())
        self.identity.server_context()  # a broken identity fails here, not per connection
        server = await asyncio.get_running_loop().create_server(lambda: _Unread(self), self.host, self.port)
        zc = await self._advertise() if self.advertise else None
        self.ready.set()
        self.say(f"{self.name}: serving the cluster on {self.name_for_humans()}:{self.port} (mutual TLS"
                 f"{'; an anchor: it coordinates a group of its own' if self.anchor else ''}); "
                 f"llama.cpp's RPC server on 127.0.0.1:{self.rpc_port}, {self.threads} threads")
        try:
            await stop.wait()
        finally:
            watch.cancel()
            server.close()
            if zc:
                await zc[0].async_unregister_service(zc[1])
                await zc[0].async_close()
            if self._rpc and self._rpc.returncode is None:
                self._rpc.kill()
                await self._rpc.wait()
