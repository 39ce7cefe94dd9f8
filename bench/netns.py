"""Network namespaces as separate hosts on one Linux machine (root only): each gets a veth pair to
this (the root) namespace, on a /30 of its own in 10.213.0.0/16, and its own loopback — so a peer
agent's loopback-only llama.cpp RPC server is really out of reach from outside its namespace.

    with Host("far", 3) as h:           # namespace edge-far, this side 10.213.3.1, the host 10.213.3.2
        h.popen(["edge", "peer", "serve", "--host", h.address, ...])

Traffic stays on this machine: only the addresses of namespaces made here are used. Nothing is
routed between namespaces (ip_forward untouched): a host reaches this namespace and nothing else.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    return subprocess.run(argv, check=check, capture_output=True, text=True)


class Host:
    def __init__(self, name: str, index: int):
        if not 1 <= index <= 250:
            raise ValueError("a host index is 1..250")
        self.ns, self.index = f"edge-{name}", index
        self.outer, self.inner = f"edo{index}", f"edi{index}"
        self.gateway, self.address = f"10.213.{index}.1", f"10.213.{index}.2"

    def __enter__(self) -> Host:
        self.__exit__()  # what a killed earlier run left behind
        ip("netns", "add", self.ns)
        ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        ip("link", "set", self.inner, "netns", self.ns)
        ip("addr", "add", f"{self.gateway}/30", "dev", self.outer)
        ip("link", "set", self.outer, "up")
        ip("addr", "add", f"{self.address}/30", "dev", self.inner, ns=self.ns)
        ip("link", "set", self.inner, "up", ns=self.ns)
        ip("link", "set", "lo", "up", ns=self.ns)
        return self

    def argv(self, argv: list[str]) -> list[str]:
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup a process is in
        # (an agent under a memory cap would report the machine's free memory instead of the cap's)
        return ["nsenter", f"--net=/run/netns/{self.ns}", *argv]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), check=False, **kw)

    def __exit__(self, *exc: object) -> None:
        ip("link", "del", self.outer, check=False)
        if Path(f"/run/netns/{self.ns}").exists():
            for pid in subprocess.run(["ip", "netns", "pids", self.ns], check=False, capture_output=True, text=True).stdout.split():
                subprocess.run(["kill", "-9", pid], check=False)
            ip("netns", "del", self.ns, check=False)
