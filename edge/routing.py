"""The routing a model shows in use, kept beside it: for a GGUF run straight from the file, every
token's experts are recorded while it runs and saved in edge's cache when the model closes, keyed
by the file's identity (its size and the SHA-256 of its first MiB: the header, tensor table and
metadata), so a renamed or moved copy finds it too. The next load sizes its per-layer caches
from the SCH curves of what was recorded; ``edge locality MODEL.gguf`` reads it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from edge.moe.trace import RoutingTrace, TraceRecorder
from edge.paths import cache_dir

log = logging.getLogger(__name__)
KEEP_TOKENS = 8192  # the most recent tokens kept: enough for SCH at m = 16, a few hundred KB per model
SCH_WINDOW = 16  # the cache sizing window, as offload bundles measure it (edge/builder/offload.py)
MIN_TOKENS = 128  # fewer recorded tokens say too little about a layer's curve to size its cache by


def identity(path: Path) -> str:
    """A key for a model file that survives renames: its size and the hash of its first MiB."""
    path = Path(path)
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:20]


def trace_path(path: Path) -> Path:
    return cache_dir("routing") / f"{Path(path).stem}-{identity(path)}.npz"


def recorded(path: Path) -> RoutingTrace | None:
    """The routing recorded for this model file, or None."""
    where = trace_path(path)
    if not where.is_file():
        return None
    try:
        return RoutingTrace.load(where)
    except Exception as e:  # a damaged record is measured again, not fatal
        log.warning("ignoring the damaged routing record %s (%s)", where, e)
        return None


def locality_of(trace: RoutingTrace | None) -> dict:
    """What cache sizing reads from a trace: per-layer SCH curves and hotness ({} without one)."""
    if trace is None or trace.n_tokens < MIN_TOKENS:
        return {}
    from edge.moe.locality import sch

    curves = [sch(trace.layer(i), trace.n_experts, SCH_WINDOW).round(5).tolist() for i in range(trace.n_layers)]
    return {"sch": curves, "hotness": trace.hotness().round(5).tolist(), "tokens": trace.n_tokens,
            "window": SCH_WINDOW, "source": "routing recorded in use"}


class UsageRecorder:
    """A route observer for an engine running ``path``; :meth:`save` appends what it saw to the record."""

    def __init__(self, path: Path, n_layers: int, n_experts: int):
        self.path = Path(path)
        self.rec = TraceRecorder(n_layers, n_experts)
        self.seen = 0

    def __call__(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        self.rec(layer, ids, weights)
        if layer == 0:
            self.seen += len(ids)

    def save(self) -> None:
        if self.seen == 0:
            return
        new = self.rec.trace()
        old = recorded(self.path)
        if old is not None and old.ids.shape[1:] == new.ids.shape[1:] and old.n_experts == new.n_experts:
            ids, w = np.concatenate([old.ids, new.ids]), np.concatenate([old.weights, new.weights])
        else:
            ids, w = new.ids, new.weights
        trace = RoutingTrace(ids=ids[-KEEP_TOKENS:], weights=w[-KEEP_TOKENS:], n_experts=new.n_experts,
                             meta={"model": self.path.name, "source": "recorded in use"})
        trace.save(trace_path(self.path))


PLAN_TOKENS = 1024  # the most recent recorded tokens the planner's replays use (each replay is Python)


def planning_locality(path: Path) -> dict:
    """What the planner reads for a GGUF run from the file: the recorded routing's SCH curves and
    the engine's replayed loads per token (prefetch off) at every cache size, {} when too little
    was recorded."""
    trace = recorded(path)
    if trace is None or trace.n_tokens < MIN_TOKENS:
        return {}
    from edge.builder.offload import locality_from

    recent = RoutingTrace(ids=trace.ids[-PLAN_TOKENS:], weights=trace.weights[-PLAN_TOKENS:],
                          n_experts=trace.n_experts, meta=trace.meta)
    return locality_from(recent, None, SCH_WINDOW) | {"source": "routing recorded in use"}
