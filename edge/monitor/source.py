"""Reading a server's Prometheus metrics into what the monitor shows: one ``Snapshot`` per scrape,
and the rates between two scrapes (tokens/s, SSD MB/s, time to first token of the requests that
finished between them)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Snapshot:
    at: float
    resident_bytes: float = 0.0
    budget_bytes: float | None = None
    generation_tokens: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    ssd_bytes: float = 0.0
    cache_queries: float = 0.0
    cache_hits: float = 0.0
    layer_queries: dict[int, float] = field(default_factory=dict)
    layer_hits: dict[int, float] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)  # bits (or GGUF types) -> experts computed
    stack_level: float | None = None
    running: float = 0.0
    waiting: float = 0.0
    engine_tok_s: float | None = None
    peers: dict[str, dict[str, float]] = field(default_factory=dict)  # member -> layers, sent, received, lost
    replans: float = 0.0


# metric sample -> (Snapshot field, how samples of several slots combine)
SCALARS = {
    "edge:resident_bytes": ("resident_bytes", max), "edge:memory_budget_bytes": ("budget_bytes", max),
    "edge:generation_tokens_total": ("generation_tokens", max),
    "edge:time_to_first_token_seconds_sum": ("ttft_sum", max),
    "edge:time_to_first_token_seconds_count": ("ttft_count", max),
    "edge:ssd_read_bytes_total": ("ssd_bytes", sum), "edge:expert_cache_queries_total": ("cache_queries", sum),
    "edge:expert_cache_hits_total": ("cache_hits", sum), "edge:stack_level": ("stack_level", max),
    "edge:num_requests_running": ("running", max), "edge:num_requests_waiting": ("waiting", max),
    "edge:decode_tokens_per_second": ("engine_tok_s", max), "edge:group_replans_total": ("replans", max),
}
# metric sample -> the member's field (a model run across a group)
PEER = {"edge:peer_layers": "layers", "edge:peer_sent_bytes_total": "sent", "edge:peer_received_bytes_total": "received",
        "edge:peer_lost": "lost"}
# metric sample -> (Snapshot dict field, the label that keys it); slots add up
KEYED = {
    "edge:expert_cache_layer_queries_total": ("layer_queries", "layer"),
    "edge:expert_cache_layer_hits_total": ("layer_hits", "layer"),
    "edge:experts_served_total": ("served", "bits"),
}


def parse(text: str, at: float | None = None) -> Snapshot:
    """A Snapshot of a /metrics page (Prometheus text, parsed by prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families

    s = Snapshot(at=time.time() if at is None else at)
    seen: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        for x in fam.samples:
            if x.name in SCALARS:
                seen.setdefault(x.name, []).append(x.value)
            elif x.name in PEER:
                s.peers.setdefault(x.labels["peer"], {})[PEER[x.name]] = x.value
            elif x.name in KEYED:
                name, label = KEYED[x.name]
                key = int(x.labels[label]) if label == "layer" else x.labels[label]
                values = getattr(s, name)
                values[key] = values.get(key, 0) + x.value
    for metric, values in seen.items():
        name, combine = SCALARS[metric]
        setattr(s, name, combine(values))
    return s


@dataclass
class Rates:
    tok_s: float
    ssd_mb_s: float
    ttft_s: float | None  # mean over the requests that got their first token in the interval
    layer_hit_rate: dict[int, float]  # over the whole run (None-free: layers with lookups only)
    peer_kb_s: dict[str, tuple[float, float]] = field(default_factory=dict)  # member -> (up, down) KB/s


def rates(prev: Snapshot | None, now: Snapshot) -> Rates:
    dt = max(1e-9, now.at - prev.at) if prev else None
    tok = (now.generation_tokens - prev.generation_tokens) / dt if prev else 0.0
    ssd = (now.ssd_bytes - prev.ssd_bytes) / dt / 1e6 if prev else 0.0
    n = now.ttft_count - (prev.ttft_count if prev else 0)
    ttft = (now.ttft_sum - (prev.ttft_sum if prev else 0)) / n if n > 0 else None
    hit = {i: now.layer_hits.get(i, 0) / q for i, q in sorted(now.layer_queries.items()) if q}
    wire = {}
    for peer, x in now.peers.items():
        was = prev.peers.get(peer, {}) if prev else {}
        wire[peer] = tuple(max(0.0, (x.get(k, 0) - was.get(k, 0)) / dt / 1e3) if dt and was else 0.0
                           for k in ("sent", "received"))
    return Rates(max(0.0, tok), max(0.0, ssd), ttft, hit, wire)


class ServerSource:
    """An ``edge serve`` at ``url``: its /metrics, and the admin endpoint that changes the budget."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 3.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def metrics_text(self) -> str:
        req = urllib.request.Request(self.url + "/metrics", headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return r.read().decode("utf-8")

    def set_budget(self, budget: str) -> str:
        body = json.dumps({"memory_budget": budget}).encode()
        req = urllib.request.Request(self.url + "/edge/admin/memory-budget", data=body, method="POST",
                                     headers={**self.headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                json.load(r)
            return f"memory budget set to {budget}"
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}").get("error", {}).get("message", f"HTTP {e.code}")


Fetch = Callable[[], str]
