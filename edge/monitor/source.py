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


def parse(text: str, at: float | None = None) -> Snapshot:
    """A Snapshot of a /metrics page (Prometheus text, parsed by prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families

    s = Snapshot(at=time.time() if at is None else at)
    for fam in text_string_to_metric_families(text):
        for x in fam.samples:
            n, v, lab = x.name, x.value, x.labels
            if n == "edge:resident_bytes":
                s.resident_bytes = max(s.resident_bytes, v)
            elif n == "edge:memory_budget_bytes":
                s.budget_bytes = v
            elif n == "edge:generation_tokens_total":
                s.generation_tokens = v
            elif n == "edge:time_to_first_token_seconds_sum":
                s.ttft_sum = v
            elif n == "edge:time_to_first_token_seconds_count":
                s.ttft_count = v
            elif n == "edge:ssd_read_bytes_total":
                s.ssd_bytes += v
            elif n == "edge:expert_cache_queries_total":
                s.cache_queries += v
            elif n == "edge:expert_cache_hits_total":
                s.cache_hits += v
            elif n == "edge:expert_cache_layer_queries_total":
                s.layer_queries[int(lab["layer"])] = s.layer_queries.get(int(lab["layer"]), 0) + v
            elif n == "edge:expert_cache_layer_hits_total":
                s.layer_hits[int(lab["layer"])] = s.layer_hits.get(int(lab["layer"]), 0) + v
            elif n == "edge:experts_served_total":
                s.served[lab["bits"]] = s.served.get(lab["bits"], 0) + v
            elif n == "edge:stack_level":
                s.stack_level = v
            elif n == "edge:num_requests_running":
                s.running = v
            elif n == "edge:num_requests_waiting":
                s.waiting = v
            elif n == "edge:decode_tokens_per_second":
                s.engine_tok_s = v
    return s


@dataclass
class Rates:
    tok_s: float
    ssd_mb_s: float
    ttft_s: float | None  # mean over the requests that got their first token in the interval
    layer_hit_rate: dict[int, float]  # over the whole run (None-free: layers with lookups only)


def rates(prev: Snapshot | None, now: Snapshot) -> Rates:
    dt = max(1e-9, now.at - prev.at) if prev else None
    tok = (now.generation_tokens - prev.generation_tokens) / dt if prev else 0.0
    ssd = (now.ssd_bytes - prev.ssd_bytes) / dt / 1e6 if prev else 0.0
    n = now.ttft_count - (prev.ttft_count if prev else 0)
    ttft = (now.ttft_sum - (prev.ttft_sum if prev else 0)) / n if n > 0 else None
    hit = {i: now.layer_hits.get(i, 0) / q for i, q in sorted(now.layer_queries.items()) if q}
    return Rates(max(0.0, tok), max(0.0, ssd), ttft, hit)


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
