"""Finding the members of this cluster on the local network: mDNS/DNS-SD (zeroconf) browse of
``_edge-peer._tcp``, kept to the services that name this cluster. Where multicast is blocked, peers
are given by address instead (``--peer HOST:PORT``); either way a peer is only used after mutual
TLS proves it is a member."""

from __future__ import annotations

import socket
import time

from edge.d2d.agent import SERVICE
from edge.d2d.identity import Identity


def discover(identity: Identity, seconds: float = 2.0) -> list[str]:
    """host:port of every advertised member of this device's cluster seen within ``seconds``."""
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    cluster = identity.cluster_id().encode()
    found: dict[str, str] = {}
    zc = Zeroconf()

    class Listener(ServiceListener):
        def add_service(self, zc, type_, name):
            info = zc.get_service_info(type_, name, timeout=int(seconds * 1000))
            if info and info.properties.get(b"cluster") == cluster and info.addresses:
                found[name] = f"{socket.inet_ntoa(info.addresses[0])}:{info.port}"

        update_service = add_service

        def remove_service(self, zc, type_, name):
            found.pop(name, None)

    try:
        ServiceBrowser(zc, SERVICE, Listener())
        time.sleep(seconds)
    finally:
        zc.close()
    return sorted(found.values())
