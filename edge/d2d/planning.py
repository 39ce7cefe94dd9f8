"""From a GGUF and the members' measurements to a placement: the numbers edge.d2d.split needs.

* bytes per layer: the file's own ``blk.N.*`` tensors (the largest layer) + that layer's KV cache
  at the context (f16 K and V, as llama.cpp keeps them);
* what only the coordinator holds: the embeddings, the output matrix and norm;
* a member's seconds per layer per token: the bytes one token reads in a layer (attention and
  router whole, ``top_k`` of the experts) at the member's measured llama.cpp streaming rate
  (``edge profile``: ``llama_stream_gbps``), plus its measured fixed cost per layer
  (``llama_layer_us``); a member without those measurements is an error naming it;
* the wire, per decoded token, as counted on the relay (edge.d2d.relay: bytes and request-reply
  turns each way; default model, 256-token context, 2026-12-02): llama.cpp's RPC client pipelines a
  remote run's input, graph computation and output read into **one** round trip; a remote run takes
  1.2-7.9 KB of inputs (the first one the most: positions and attention mask) and sends back the
  hidden state (4 x hidden bytes), the last one the logits (4 x vocabulary bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edge.d2d.shard import Link
from edge.d2d.split import Member, ModelCosts, Split, split_layers
from edge.errors import EdgeError

# The group's llama.cpp process on the coordinator, before any layer: Python, numpy and llama.cpp's
# libraries (edge.d2d.worker with the 17 MB default model loaded: 67 MiB RSS, 46 MiB its own).
WORKER_BASE_BYTES = 64 << 20
RPC_ROUND_TRIPS = 1.0   # per remote run per decoded token (relay: 1.0 turns/token in every split tried)
RUN_INPUT_BYTES = 8192  # a remote run's inputs per token, rounded up from the 1.2-7.9 KB measured


@dataclass(frozen=True)
class GGUFLayers:
    n_layers: int
    layer_bytes: int          # weights of the largest layer + its KV cache at the context
    layer_read_bytes: int     # bytes one decoded token reads in a layer
    coordinator_bytes: int
    hidden: int
    vocab: int


def gguf_layers(path: Path, n_ctx: int) -> GGUFLayers:
    from edge.formats.gguf_read import open_reader, read_spec

    reader = open_reader(path)
    spec = read_spec(path, reader)
    per_layer: dict[int, int] = {}
    reads: dict[int, float] = {}
    coordinator = 0
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if not m:
            coordinator += t.n_bytes
            continue
        i = int(m.group(1))
        per_layer[i] = per_layer.get(i, 0) + t.n_bytes
        share = spec.top_k / spec.n_experts if "_exps" in t.name else 1.0
        reads[i] = reads.get(i, 0.0) + t.n_bytes * share
    kv = 2 * n_ctx * spec.n_kv_heads * spec.head_dim * 2
    return GGUFLayers(spec.n_layers, max(per_layer.values()) + kv, int(max(reads.values())), coordinator,
                      spec.hidden_size, spec.vocab_size)


def stream_gbps(profile: dict) -> float | None:
    """GB/s of weights a device's llama.cpp reads while decoding, as the single-device planner
    takes it (edge.plan.costs.stream_bytes_per_s): llama.cpp's measured MoE streaming rate; where
    the probe could not tell DRAM from a large last-level cache, ggml's measured GEMV rate; else
    a share of the measured memory bandwidth."""
    from edge.plan.costs import GEMV_SHARE_OF_PEAK, gemv_stream_bps

    if profile.get("llama_stream_gbps"):
        return float(profile["llama_stream_gbps"])
    if profile.get("gemv_q4_gflops"):
        return gemv_stream_bps(float(profile["gemv_q4_gflops"])) / 1e9
    if profile.get("memory_bandwidth_gbps"):
        return float(profile["memory_bandwidth_gbps"]) * GEMV_SHARE_OF_PEAK
    return None


def layer_seconds(profile: dict, read_bytes: int, who: str) -> float:
    gbps, us = stream_gbps(profile), profile.get("llama_layer_us")
    if not gbps or us is None:
        raise EdgeError(f"{who} has no measured llama.cpp streaming rate and per-layer cost (run 'edge profile' "
                        "there): its share of a model cannot be predicted")
    return read_bytes / (gbps * 1e9) + us * 1e-6


@dataclass(frozen=True)
class PeerInfo:
    """What the coordinator knows of a member: its address, hello (name, free memory, profile)
    and measured link."""

    address: str
    name: str
    free_bytes: int
    profile: dict
    link: Link
    threads: int = 0
    anchor: bool = False   # it coordinates a group of its own (edge peer serve --anchor)
    direct: str = ""       # host:port the other members reach it at (its own listening address)


def members(gguf: Path, me: dict, peers: list[PeerInfo], n_ctx: int) -> tuple[Member, list[Member], ModelCosts]:
    """The split's inputs: this device, the remote members (named as the peers name themselves)
    and the model's costs."""
    g = gguf_layers(gguf, n_ctx)
    costs = ModelCosts(n_layers=g.n_layers, layer_bytes=g.layer_bytes, coordinator_bytes=g.coordinator_bytes,
                       hop_bytes=RUN_INPUT_BYTES + 4 * g.hidden, round_trips=RPC_ROUND_TRIPS,
                       tail_bytes=4 * g.vocab, run_s=float(me.get("remote_run_s") or 0.0))
    coordinator = Member("this device", int(me["free_bytes"]) - WORKER_BASE_BYTES,
                         layer_seconds(me["profile"], g.layer_read_bytes, "this device"))
    remotes = [Member(p.name, p.free_bytes, layer_seconds(p.profile, g.layer_read_bytes, p.name), p.link) for p in peers]
    return coordinator, remotes, costs


def place(gguf: Path, me: dict, peers: list[PeerInfo], n_ctx: int) -> tuple[Split, list[tuple[str, int]]]:
    """The split with the least predicted time per token, and the placement GroupBackend takes:
    (address, layers) of every remote member used, in running order."""
    coordinator, remotes, costs = members(gguf, me, peers, n_ctx)
    split = split_layers(coordinator, remotes, costs)
    by_name = {p.name: p.address for p in peers}
    return split, [(by_name[n], k) for n, k in split.layers.items() if n in by_name]
