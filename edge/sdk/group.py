"""``edge.load(gguf, peers=[...])``: one GGUF run across this device and the members of its
cluster (edge.d2d): each member asked who it is and its link measured, the layers split by
predicted time per token (edge.d2d.planning), llama.cpp run over its RPC backend in a supervised
process; a member lost mid-generation is replaced by a new split over the members left."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import EdgeError

if TYPE_CHECKING:
    from edge.d2d.shard import Link

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
                                  measure_link(identity, host, port, rounds=rounds), int(h.get("threads", 0)),
                                  bool(h.get("anchor")), f"{h.get('host') or host}:{h.get('port') or port}"))
        except PeerUnreachable as e:
            if unreachable is None:
                log.warning("%s: left out of the group", e)
            else:
                unreachable(f"{host}:{port}", e)
    if require and not infos:
        raise EdgeError(f"none of the {len(addresses)} peers answered: {', '.join(addresses)}")
    return infos


def measure_between(identity, a, b) -> Link:
    """The link from member ``a`` to member ``b`` as ``a`` measures it (its agent's ``measure``
    op, at the address ``b`` listens on); PeerUnreachable when ``a`` cannot reach ``b``."""
    from edge.d2d.client import PeerUnreachable, connect, parse_address
    from edge.d2d.shard import Link
    from edge.d2d.wire import WireError

    host, port = parse_address(a.address, DEFAULT_PORT)
    b_host, b_port = parse_address(b.direct or b.address, DEFAULT_PORT)
    try:
        with connect(identity, host, port, timeout=30.0) as ch:
            ch.send({"op": "measure", "host": b_host, "port": b_port})
            got = ch.recv()
    except (OSError, WireError) as e:
        raise PeerUnreachable(f"peer {a.name}: measuring its link to {b.name} failed ({e})") from None
    if "error" in got:
        raise PeerUnreachable(f"{a.name} cannot reach {b.name}: {got['error']}")
    return Link(float(got["rtt_s"]), float(got["bytes_per_s"]))


def group_of(identity, infos: list, payload_bytes: int | None = None) -> tuple[list, dict[str, str], list[str]]:
    """This device's group among the members (edge.d2d.shard: classical MDS of the distance matrix,
    K-means seeded at the anchors — this device and every member started with ``--anchor`` —
    every group holding its anchor). With no anchor among the members everyone is in this
    device's group and nothing more is measured; otherwise each pair of members is measured too
    (one asks the other's agent; a pair that cannot reach each other counts the path through this
    device). Returns (members of this device's group, member -> its group's anchor, notes)."""
    from edge.d2d.client import PeerUnreachable
    from edge.d2d.planning import RUN_INPUT_BYTES
    from edge.d2d.shard import Link, distance_matrix, group

    me = "this device"
    if not any(i.anchor for i in infos):
        return list(infos), {i.name: me for i in infos}, []
    payload = payload_bytes or RUN_INPUT_BYTES
    names = [me] + [i.name for i in infos]
    links = {(me, i.name): i.link for i in infos}
    notes = []
    for x, a in enumerate(infos):
        for b in infos[x + 1:]:
            try:
                links[(a.name, b.name)] = measure_between(identity, a, b)
            except PeerUnreachable as e:
                links[(a.name, b.name)] = Link(a.link.rtt_s + b.link.rtt_s, min(a.link.bytes_per_s, b.link.bytes_per_s))
                notes.append(f"{e}: counted through this device")
    anchors = [0] + [x + 1 for x, i in enumerate(infos) if i.anchor]
    groups = group(distance_matrix(names, links, payload), anchors)
    anchor_of = {names[m]: names[g[0]] for g in groups for m in g if m != 0}
    mine = [i for i in infos if anchor_of[i.name] == me]
    notes += [f"{i.name}: an anchor, it leads a group of its own; not used here" if i.anchor else
              f"{i.name}: in {anchor_of[i.name]}'s group (nearer to that anchor than to this device); not used here"
              for i in infos if anchor_of[i.name] != me]
    return mine, anchor_of, notes


def this_device(threads: int | None = None) -> dict:
    """What the split needs of the coordinator: its free memory now, its measured llama.cpp rates
    and what handing a run over to a member costs it (edge.d2d.probe; both cached a day)."""
    from edge.d2d.agent import memory_now
    from edge.d2d.probe import remote_run_s
    from edge.device.profile import cached_profile
    from edge.hardware import default_threads

    p = cached_profile()
    return memory_now() | {"profile": {k: getattr(p, k) for k in ("llama_stream_gbps", "gemv_q4_gflops",
                                                                  "memory_bandwidth_gbps", "llama_layer_us")},
                           "remote_run_s": remote_run_s(threads or default_threads())}


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
    group formed (group_of), its memory (at most ``budget`` in all, this process included) — and
    the split over that group with the least predicted time per token. Returns (identity, every
    member measured, this device, split, placement)."""
    from edge.d2d.discovery import discover
    from edge.d2d.planning import place

    identity = cluster_identity(identity_dir)
    peers = parse_peers(peers)
    addresses = discover(identity) if peers == "auto" else peers
    if not addresses:
        raise EdgeError("no peers of this cluster found by mDNS; give them as host:port")
    infos = measure_peers(identity, addresses)
    mine, _, notes = group_of(identity, infos)
    me = this_device()
    if budget is not None:
        import psutil

        me["free_bytes"] = min(me["free_bytes"], budget - psutil.Process().memory_info().rss)
    split, placement = place(path, me, mine, n_ctx)
    split.reasons.extend(notes)
    return identity, infos, me, split, placement


def load_group(path: Path, name: str, peers: list[str] | str, *, n_ctx: int, n_threads: int | None,
               budget: int | None = None, identity_dir: Path | None = None, notes: tuple[str, ...] = (),
               watch_s: float = 10.0):
    """``budget``: what this device may hold in all (this process and the group's llama.cpp
    process); the layers it cannot hold go to the peers. Every ``watch_s`` seconds the cluster is
    looked at again and members that joined or left re-form the group (MembershipWatch)."""
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

    def plan(members: list) -> list:  # an EdgeError with the numbers when what is left cannot hold the model
        return place(path, me, group_of(identity, members)[0], n_ctx)[1]

    def replan(old, lost: list[str]):
        return plan([i for i in watch.infos if i.address not in lost])

    backend = GroupBackend(path, identity, placement, n_ctx=n_ctx, threads=n_threads or default_threads(),
                           replan=replan)
    watch = MembershipWatch(backend, identity, parse_peers(peers), infos, plan, every_s=watch_s).start()
    vocab = load_model(path, vocab_only=True)
    notes = (*notes, f"run across {len(placement)} peer(s): {split_text(split)}", *split.reasons)
    return Model(name=name, spec=spec, backend=backend, tokenizer=LlamaCppTokenizer(vocab, path.name), source=path,
                 notes=notes)


DRIFT_S = 0.005  # a heartbeat round trip this far (and 50%) from the measured one means the link changed


class MembershipWatch:
    """Members joining or leaving, and links that change, re-form the group while a model runs:
    every ``every_s`` seconds the cluster's members are found again (mDNS for ``"auto"``, else the
    listed addresses) and greeted (a hello each, no link measured), and the members in use are
    checked against their heartbeats' round trips; when the reachable set or a link changed, the
    links are measured, the group formed again and ``plan(infos)`` gives the new placement, which
    the backend takes at its next eval (GroupBackend.regroup; nothing happens when the split comes
    out the same). A lost member is the heartbeat's business (GroupBackend's replan)."""

    def __init__(self, backend, identity, peers: list[str] | str, infos: list, plan, *, every_s: float = 10.0):
        import threading

        self.backend, self.identity, self.peers, self.plan = backend, identity, peers, plan
        self.infos, self.every_s = list(infos), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-d2d-membership", daemon=True)
        backend.on_close.append(self.close)

    def start(self) -> "MembershipWatch":
        self._thread.start()
        return self

    def reachable(self) -> set[str]:
        from edge.d2d.client import hello, parse_address
        from edge.d2d.discovery import discover

        out = set()
        for a in discover(self.identity) if self.peers == "auto" else self.peers:
            host, port = parse_address(a, DEFAULT_PORT)
            try:
                hello(self.identity, host, port, timeout=2.0)
                out.add(f"{host}:{port}")
            except EdgeError:  # unreachable, or no longer a member: not in the group
                pass
        return out

    def drifted(self) -> list[str]:
        """The members in use whose link, as their heartbeats see it now, is no longer the one
        measured: the round trip off by more than DRIFT_S and half of what it was."""
        now = self.backend.link_rtts()
        out = []
        for i in self.infos:
            hb = now.get(i.address)
            if hb is not None and abs(hb - i.link.rtt_s) > max(DRIFT_S, 0.5 * i.link.rtt_s):
                out.append(f"the link to {i.name} changed (RTT {i.link.rtt_s * 1e3:.1f} -> {hb * 1e3:.1f} ms)")
        return out

    def check(self) -> bool:
        """One look at the cluster; True when its members or their links changed (the backend
        then places the group again if the new split differs)."""
        now, known = self.reachable(), {i.address for i in self.infos}
        drift = self.drifted()
        if now == known and not drift:
            return False
        infos = measure_peers(self.identity, sorted(now), require=False, unreachable=lambda a, e: None)
        joined = sorted(i.name for i in infos if i.address not in known)
        left = sorted(i.name for i in self.infos if i.address not in now)
        self.infos = infos
        why = "; ".join(x for x in (f"joined: {', '.join(joined)}" if joined else "",
                                    f"left: {', '.join(left)}" if left else "", *drift) if x)
        self.backend.regroup(self.plan(infos), f"the cluster changed ({why})")
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.check()
            except EdgeError as e:
                log.warning("looking for members joining or leaving failed: %s", e)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every_s + 10)


def split_text(split) -> str:
    return (f"predicted {1 / split.predicted_s:.1f} tok/s ({split.compute_s * 1e3:.1f} ms compute + "
            f"{split.network_s * 1e3:.1f} ms network per token)")
