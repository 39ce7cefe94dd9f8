"""Which layers of a model each member of a group runs: the split that minimizes the predicted
time per decoded token under every member's free memory, from measured numbers only. Pure.

The model of one decode step, as llama.cpp's RPC backend runs a layer split (the coordinator
keeps the embeddings, the output matrix and the first layers; each remote member runs a
contiguous run of layers; ggml's scheduler sends a remote run its input activations and fetches
its output through the coordinator):

    time/token = sum_i layers_i x (layer_s_i + layer_wire_bytes / bandwidth_i)
               + sum over remote members used of (round_trips x rtt_i + hop_bytes / bandwidth_i + run_s)
               + tail_bytes / bandwidth of the last remote member

(``run_s``: what handing a run over costs the coordinator itself, measured by edge.d2d.probe;
the wire terms are zero for the coordinator; the last remote run holds the model's last layer
and sends back what the output needs, so the member with the fastest link goes last). For a fixed
set of members used, the per-layer term is smallest when the cheapest members take as many
layers as their memory holds, so the best split is found exactly by trying every subset of the
remote members (groups are small: at most GGML_RPC_MAX_SERVERS = 16 servers) and filling each
subset cheapest first. A member the best split does not use is left out with the reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from edge.d2d.shard import Link
from edge.errors import EdgeError

MAX_REMOTE = 16  # GGML_RPC_MAX_SERVERS


@dataclass(frozen=True)
class Member:
    """A device of the group: its free memory for this model, the seconds one layer of this model
    takes on it per decoded token (measured), and its link to the coordinator (None: it is the
    coordinator)."""

    name: str
    free_bytes: int
    layer_s: float
    link: Link | None = None


@dataclass(frozen=True)
class ModelCosts:
    """What the model asks of a split: layer count, bytes one layer holds (weights + its KV cache
    at the context), the bytes only the coordinator holds (embeddings, output matrix, compute
    buffers); per decoded token, the bytes one remote run costs (activations in and out), the
    bytes per remote layer (the graph's description), the bytes the last run sends back, and the
    round trips one remote run costs (all measured on llama.cpp's RPC protocol: edge.d2d.planning)."""

    n_layers: int
    layer_bytes: int
    coordinator_bytes: int
    hop_bytes: int
    round_trips: float
    layer_wire_bytes: int = 0
    tail_bytes: int = 0
    run_s: float = 0.0   # what handing one remote run over costs the coordinator, beyond the link (edge.d2d.probe)


@dataclass(frozen=True)
class Split:
    layers: dict[str, int]            # member -> layers, in running order (coordinator first)
    predicted_s: float                # predicted seconds per decoded token
    compute_s: float
    network_s: float
    reasons: list[str] = field(default_factory=list)


def _per_layer(m: Member, costs: ModelCosts) -> float:
    return m.layer_s + (costs.layer_wire_bytes / m.link.bytes_per_s if m.link is not None else 0.0)


def _fill(members: list[Member], free: dict[str, int], costs: ModelCosts) -> dict[str, int] | None:
    """Every remote member one layer (a member used holds at least one), then the rest cheapest
    first: the least per-layer cost under those bounds (a linear cost over boxes is filled greedily)."""
    cap = {m.name: free[m.name] // costs.layer_bytes for m in members}
    out = {m.name: (1 if m.link is not None else 0) for m in members}
    if any(out[n] > cap[n] for n in out) or sum(out.values()) > costs.n_layers:
        return None
    left = costs.n_layers - sum(out.values())
    for m in sorted(members, key=lambda m: _per_layer(m, costs)):
        take = min(left, cap[m.name] - out[m.name])
        out[m.name], left = out[m.name] + take, left - take
    return None if left else out


def _run_s(m: Member, layers: int, costs: ModelCosts) -> float:
    """One remote run of ``layers`` layers on ``m`` per token: its round trips, its bytes, the hand-over."""
    return (costs.round_trips * m.link.rtt_s + (costs.hop_bytes + layers * costs.layer_wire_bytes) / m.link.bytes_per_s
            + costs.run_s)


def _time(members: list[Member], layers: dict[str, int], costs: ModelCosts) -> tuple[float, float]:
    compute = sum(layers[m.name] * m.layer_s for m in members)
    remote = [m for m in members if m.link is not None and layers[m.name]]
    network = sum(_run_s(m, layers[m.name], costs) for m in remote)
    if remote:
        network += costs.tail_bytes / max(m.link.bytes_per_s for m in remote)
    return compute, network


def split_layers(coordinator: Member, remotes: list[Member], costs: ModelCosts) -> Split:
    """The split of ``costs.n_layers`` layers over the coordinator and ``remotes`` with the least
    predicted time per token; an EdgeError with the numbers when no subset holds the model."""
    if coordinator.link is not None or any(m.link is None for m in remotes):
        raise EdgeError("the coordinator has no link to itself and every remote member has one")
    if len(remotes) > MAX_REMOTE:
        raise EdgeError(f"llama.cpp's RPC backend takes at most {MAX_REMOTE} servers; the group has {len(remotes)}")
    if costs.n_layers < 1 or costs.layer_bytes < 1:
        raise EdgeError(f"a model needs layers and bytes per layer; got {costs.n_layers} x {costs.layer_bytes}")
    free = {m.name: m.free_bytes for m in remotes} | {coordinator.name: coordinator.free_bytes - costs.coordinator_bytes}
    if free[coordinator.name] < 0:
        raise EdgeError(f"{coordinator.name} has {coordinator.free_bytes / 2**20:.0f} MiB free; the embeddings, output "
                        f"and buffers it must hold take {costs.coordinator_bytes / 2**20:.0f} MiB")
    best = None
    for r in range(len(remotes) + 1):
        for used in itertools.combinations(remotes, r):
            members = [coordinator, *used]
            layers = _fill(members, free, costs)
            if layers is None:
                continue
            compute, network = _time(members, layers, costs)
            if best is None or compute + network < best[0] - 1e-12:
                best = (compute + network, compute, network, members, layers)
    if best is None:
        total = sum(max(0, v) for v in free.values())
        raise EdgeError(f"the group holds {total / 2**30:.2f} GiB for layers; the model's {costs.n_layers} layers "
                        f"need {costs.n_layers * costs.layer_bytes / 2**30:.2f} GiB")
    total, compute, network, members, layers = best
    used = {m.name for m in members}
    reasons = [f"{coordinator.name} (coordinator): {layers[coordinator.name]} layers at "
               f"{coordinator.layer_s * 1e3:.2f} ms/layer"]
    for m in remotes:
        if m.name in used:
            wire = _run_s(m, layers[m.name], costs)
            reasons.append(f"{m.name}: {layers[m.name]} layers at {m.layer_s * 1e3:.2f} ms/layer; its link costs "
                           f"{wire * 1e3:.1f} ms/token")
        else:
            reasons.append(f"{m.name} left out: {_why_out(m, coordinator, remotes, used, free, costs, total)}")
    last = sorted((m for m in remotes if m.name in used), key=lambda m: m.link.bytes_per_s)
    order = [coordinator.name] + [m.name for m in last]  # the fastest link last: it carries the tail
    return Split({n: layers[n] for n in order}, total, compute, network, reasons)


def _why_out(m: Member, coordinator: Member, remotes: list[Member], used: set[str], free: dict[str, int],
             costs: ModelCosts, best_s: float) -> str:
    """The best split that uses ``m`` as well, against the chosen one."""
    members = [coordinator, *(r for r in remotes if r.name in used or r is m)]
    layers = _fill(members, free, costs)
    if layers is None:
        return f"it holds {free[m.name] // costs.layer_bytes} layers and the others all of them"
    compute, network = _time(members, layers, costs)
    return (f"with it {(compute + network) * 1e3:.1f} ms/token predicted, without {best_s * 1e3:.1f} "
            f"(its link: {m.link.rtt_s * 1e3:.1f} ms RTT, {m.link.bytes_per_s * 8 / 1e6:.0f} Mbit/s)")


def predict(coordinator: Member, remotes: list[Member], layers: dict[str, int], costs: ModelCosts) -> tuple[float, float]:
    """(compute, network) seconds per decoded token of a given split — any placement, exo's or a
    fixed one — by the same model split_layers minimizes; members absent from ``layers`` run none."""
    members = [coordinator, *remotes]
    return _time(members, {m.name: layers.get(m.name, 0) for m in members}, costs)


def proportional_split(members: list[Member], n_layers: int) -> dict[str, int]:
    """exo's placement (allocate_layers_proportionally): layers in proportion to free memory, the
    rounding remainders to the largest fractions; links and speeds play no part. For comparison."""
    total = sum(m.free_bytes for m in members)
    raw = [n_layers * m.free_bytes / total for m in members]
    out = [int(x) for x in raw]
    for i in sorted(range(len(members)), key=lambda i: raw[i] - out[i], reverse=True)[: n_layers - sum(out)]:
        out[i] += 1
    return {m.name: k for m, k in zip(members, out)}
