"""``edge.load(gguf, peers=[...])``: one GGUF run across this device and the members of its
cluster (edge.d2d): each member asked who it is and its link measured, the layers split by
predicted time per token (edge.d2d.planning), llama.cpp run over its RPC backend in a supervised
process; a member lost mid-generation is replaced by a new split over the members left."""

from __future__ import annotations

import logging
from pathlib import Path

from edge.errors import EdgeError

log = logging.getLogger(__name__)
DEFAULT_PORT = 50600


def parse_peers(peers: list[str] | str) -> list[str] | str:
    """``"auto"``, a comma-separated ``host:port`` list (as the CLI and EDGE_PEERS give it), or a list."""
    if isinstance(peers, str):
        return "auto" if peers == "auto" else [p.strip() for p in peers.split(",") if p.strip()]
    return list(peers)


def measure_peers(identity, addresses: list[str], *, rounds: int = 10, unreachable=None,
                  require: bool = True) -> list:
    """PeerInfo of every member at ``addresses`` (hello + measured link). An unreachable one goes to
    ``unreachable(address, error)`` (default: a warning that it is left out); with ``require``,
    none reachable is an error."""
    from edge.d2d.client import PeerUnreachable, hello, measure_link, parse_address
    from edge.d2d.planning import PeerInfo

    infos = []
    for a in addresses:
        host, port = parse_address(a, DEFAULT_PORT)
        try:
            h = hello(identity, host, port)
            infos.append(PeerInfo(f"{host}:{port}", h["member"], int(h["free_bytes"]), h.get("profile") or {},
                                  measure_link(identity, host, port, rounds=rounds), int(h.get("threads", 0))))
        except PeerUnreachable as e:
            if unreachable is None:
                log.warning("%s: left out of the group", e)
            else:
                unreachable(f"{host}:{port}", e)
    if require and not infos:
        raise EdgeError(f"none of the {len(addresses)} peers answered: {', '.join(addresses)}")
    return infos


def this_device() -> dict:
    """What the split needs of the coordinator: its free memory now and its measured llama.cpp rates."""
    from edge.d2d.agent import memory_now
    from edge.device.profile import cached_profile

    p = cached_profile()
    return memory_now() | {"profile": {k: getattr(p, k) for k in ("llama_stream_gbps", "gemv_q4_gflops",
                                                                  "memory_bandwidth_gbps", "llama_layer_us")}}


def cluster_identity(identity_dir: Path | None = None):
    """This coordinator's cluster identity; an error saying how to make one when it has none."""
    from edge.d2d.identity import Identity
    from edge.paths import cache_dir

    identity = Identity(identity_dir or cache_dir("d2d"))
    if not identity.paired:
        raise EdgeError(f"this device is in no cluster ({identity.folder}): pair peers with 'edge peers pair HOST --code CODE'")
    return identity


def plan_group(path: Path, peers: list[str] | str, *, n_ctx: int, budget: int | None = None,
               identity_dir: Path | None = None):
    """The group for a GGUF: each member asked who it is and its link measured, this device's
    memory (at most ``budget`` in all, this process included) — and the split with the least
    predicted time per token. Returns (identity, infos, this device, split, placement)."""
    from edge.d2d.discovery import discover
    from edge.d2d.planning import place

    identity = cluster_identity(identity_dir)
    peers = parse_peers(peers)
    addresses = discover(identity) if peers == "auto" else peers
    if not addresses:
        raise EdgeError("no peers of this cluster found by mDNS; give them as host:port")
    infos = measure_peers(identity, addresses)
    me = this_device()
    if budget is not None:
        import psutil

        me["free_bytes"] = min(me["free_bytes"], budget - psutil.Process().memory_info().rss)
    split, placement = place(path, me, infos, n_ctx)
    return identity, infos, me, split, placement


def load_group(path: Path, name: str, peers: list[str] | str, *, n_ctx: int, n_threads: int | None,
               budget: int | None = None, identity_dir: Path | None = None, notes: tuple[str, ...] = ()):
    """``budget``: what this device may hold in all (this process and the group's llama.cpp
    process); the layers it cannot hold go to the peers."""
    from edge.d2d.backend import GroupBackend
    from edge.d2d.planning import place
    from edge.formats.gguf_read import read_spec
    from edge.hardware import default_threads
    from edge.runtime.llamacpp import load_model
    from edge.runtime.tokenizer import LlamaCppTokenizer
    from edge.sdk.model import Model

    spec = read_spec(path)
    n_ctx = min(n_ctx, spec.context_length)
    identity, infos, me, split, placement = plan_group(path, peers, n_ctx=n_ctx, budget=budget,
                                                       identity_dir=identity_dir)

    def replan(old, lost: list[str]):
        left = [i for i in infos if i.address not in lost]
        return place(path, me, left, n_ctx)[1] if left else []

    backend = GroupBackend(path, identity, placement, n_ctx=n_ctx, threads=n_threads or default_threads(),
                           replan=replan)
    vocab = load_model(path, vocab_only=True)
    notes = (*notes, f"run across {len(placement)} peer(s): {split_text(split)}", *split.reasons)
    return Model(name=name, spec=spec, backend=backend, tokenizer=LlamaCppTokenizer(vocab, path.name), source=path,
                 notes=notes)


def split_text(split) -> str:
    return (f"predicted {1 / split.predicted_s:.1f} tok/s ({split.compute_s * 1e3:.1f} ms compute + "
            f"{split.network_s * 1e3:.1f} ms network per token)")
