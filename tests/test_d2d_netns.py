"""A peer in a network namespace of its own (a separate host on this machine, bench/netns.py):
what listens there before and after pairing (ss inside the namespace), and a stranger without the
cluster's key sending raw llama.cpp RPC commands at every port it can reach, never getting an RPC
byte back — while the same bytes sent from inside the namespace to the loopback RPC server do get
its answer, so the probe is known to speak RPC. Root only (namespaces)."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from netns import Host  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("ss") is None,
                                reason="network namespaces need root, iproute2 and ss")

EDGE = [sys.executable, "-m", "edge.cli"]
PORT = 50600
# llama.cpp's RPC HELLO (protocol v7 in the bundled build): command 14, a 24-byte request; the
# server answers with a 28-byte reply that carries its version
HELLO = bytes([14]) + (24).to_bytes(8, "little") + bytes(24)
PROBE = f"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
except OSError as e:
    print("refused", e.errno); sys.exit()
s.settimeout(5)
s.sendall({HELLO!r})
got = b""
try:
    while len(got) < 64:
        b = s.recv(64)
        if not b:
            break
        got += b
except OSError:
    pass
print(got.hex())
"""


def rpc_reply(hexdump: str) -> bool:
    return bytes.fromhex(hexdump).startswith((28).to_bytes(8, "little"))


def listening(host: Host) -> list[tuple[str, int]]:
    out = host.run(["ss", "-Htln"], capture_output=True, text=True, timeout=10).stdout
    found = []
    for line in out.splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        found.append((addr.strip("[]"), int(port)))
    return sorted(found)


def probe(host: str, port: int, inside: Host | None = None) -> str:
    argv = [sys.executable, "-c", PROBE, host, str(port)]
    r = (inside.run(argv, capture_output=True, text=True, timeout=30) if inside
         else subprocess.run(argv, capture_output=True, text=True, timeout=30))
    return r.stdout.strip()


def test_a_stranger_gets_no_rpc_byte_through_and_only_the_agent_listens_beyond_loopback(tmp_path):
    with Host("sec", 21) as h:
        agent = h.popen(EDGE + ["peer", "serve", "--host", h.address, "--port", str(PORT), "--name", "sec",
                                "--threads", "1", "--no-advertise", "--no-profile", "--identity", str(tmp_path / "peer")],
                        stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            for line in agent.stderr:
                lines.append(line)
                if "pairing code" in line:
                    break
            code = re.search(r"pairing code: (\S+)", lines[-1]).group(1)
            # unpaired: one listener, the pairing endpoint; no RPC server anywhere
            assert listening(h) == [(h.address, PORT)]
            assert not rpc_reply(probe(h.address, PORT))

            r = subprocess.run(EDGE + ["peers", "pair", f"{h.address}:{PORT}", "--code", code,
                                       "--identity", str(tmp_path / "coord")], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            for line in agent.stderr:
                if "serving the cluster" in line:
                    break
            for _ in range(100):               # the RPC server comes up beside the member channel
                ports = listening(h)
                if len(ports) > 1:
                    break
                time.sleep(0.1)
            beyond = [(a, p) for a, p in ports if a != "127.0.0.1"]
            rpc = [p for a, p in ports if a == "127.0.0.1"]
            assert beyond == [(h.address, PORT)] and len(rpc) == 1, ports
            # the probe speaks RPC: from inside the namespace the loopback server answers it
            assert rpc_reply(probe("127.0.0.1", rpc[0], inside=h))
            # from outside: the RPC port is not there, and the agent's port speaks only TLS to members
            assert probe(h.address, rpc[0]).startswith("refused")
            for port in sorted({p for _, p in ports}):
                got = probe(h.address, port)
                assert got.startswith("refused") or not rpc_reply(got), (port, got)
        finally:
            agent.kill()
            agent.wait(10)
