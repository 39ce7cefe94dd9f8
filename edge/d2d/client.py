"""The coordinator's side of the member channel: connect with mutual TLS, ask a peer who it is, and
measure the link (median round trip; timed bulk transfer)."""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from dataclasses import dataclass

from edge.d2d.identity import Identity, peer_name
from edge.d2d.shard import Link
from edge.d2d.wire import WireError, encode, read_msg_sync
from edge.errors import EdgeError


class PeerUnreachable(EdgeError):
    """A peer did not answer, refused us, or is not a member of this cluster."""


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    try:
        return (host or text.strip()), int(port) if port else default_port
    except ValueError:
        raise EdgeError(f"a peer address is HOST or HOST:PORT; got {text!r}") from None


@dataclass
class Channel:
    sock: ssl.SSLSocket
    member: str

    def __post_init__(self):
        self.file = self.sock.makefile("rb")

    def send(self, msg: dict) -> None:
        self.sock.sendall(encode(msg))

    def recv(self) -> dict:
        return read_msg_sync(self.file)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(identity: Identity, host: str, port: int, timeout: float = 5.0) -> Channel:
    """A mutually authenticated channel to the member at host:port; PeerUnreachable naming the
    reason when it does not answer or is not of this cluster."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise PeerUnreachable(f"peer {host}:{port} unreachable: {e.strerror or e}") from None
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s = identity.client_context().wrap_socket(raw)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        raise PeerUnreachable(f"peer {host}:{port} is not a member of this cluster (TLS: "
                              f"{getattr(e, 'reason', None) or e})") from None
    return Channel(s, peer_name(s))


def hello(identity: Identity, host: str, port: int, timeout: float = 5.0) -> dict:
    with connect(identity, host, port, timeout) as ch:
        ch.send({"op": "hello"})
        return ch.recv() | {"member": ch.member}


def measure_link(identity: Identity, host: str, port: int, *, rounds: int = 10, nbytes: int = 1 << 20,
                 timeout: float = 10.0) -> Link:
    """Median round trip of ``rounds`` one-line echoes, and the throughput of sending ``nbytes``
    (timed to the peer's acknowledgement, one RTT taken off)."""
    if rounds < 1 or nbytes < 1:
        raise EdgeError(f"a link measurement takes rounds >= 1 and bytes >= 1; got {rounds}, {nbytes}")
    try:
        with connect(identity, host, port, timeout) as ch:
            ch.send({"op": "echo"})
            ch.recv()
            rtts = []
            for i in range(rounds):
                t0 = time.perf_counter()
                ch.sock.sendall(b"%d\n" % i)
                if ch.file.readline() != b"%d\n" % i:
                    raise WireError("the echo came back wrong")
                rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        with connect(identity, host, port, timeout) as ch:
            ch.send({"op": "sink", "bytes": nbytes})
            block = bytes(min(nbytes, 1 << 16))
            t0 = time.perf_counter()
            for i in range(0, nbytes, len(block)):
                ch.sock.sendall(block[: min(len(block), nbytes - i)])
            if not ch.recv().get("ok"):
                raise WireError("the bulk transfer was not acknowledged")
            seconds = max(time.perf_counter() - t0 - rtt, 1e-6)
    except (OSError, WireError) as e:
        raise PeerUnreachable(f"peer {host}:{port}: link measurement failed ({e})") from None
    return Link(rtt_s=rtt, bytes_per_s=nbytes / seconds)
