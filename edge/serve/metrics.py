"""The server's Prometheus metrics (prometheus_client), named as vLLM names its own with an
``edge:`` prefix: request latencies as histograms, token counters, queue gauges, and the engine's
own telemetry (expert cache, SSD reads, memory, BitStack level) read from the models at each
scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class EngineCollector:
    """Gauges and counters read from each loaded model's ``metrics()`` at scrape time."""

    def __init__(self, models: list):
        self.models = models

    def collect(self):
        fams = {
            "queries": CounterMetricFamily("edge:expert_cache_queries", "expert cache lookups", labels=["slot"]),
            "hits": CounterMetricFamily("edge:expert_cache_hits", "expert cache hits", labels=["slot"]),
            "ssd": CounterMetricFamily("edge:ssd_read_bytes", "bytes read from storage for experts", labels=["slot"]),
            "resident": GaugeMetricFamily("edge:resident_bytes", "resident memory of the process", labels=["slot"]),
            "budget": GaugeMetricFamily("edge:memory_budget_bytes", "the memory budget", labels=["slot"]),
            "stack": GaugeMetricFamily("edge:stack_level", "BitStack blocks loaded", labels=["slot"]),
            "lq": CounterMetricFamily("edge:expert_cache_layer_queries", "expert cache lookups per layer",
                                      labels=["slot", "layer"]),
            "lh": CounterMetricFamily("edge:expert_cache_layer_hits", "expert cache hits per layer", labels=["slot", "layer"]),
            "bits": CounterMetricFamily("edge:experts_served", "expert computations by what was loaded (bits or types)",
                                        labels=["slot", "bits"]),
            "tps": GaugeMetricFamily("edge:decode_tokens_per_second", "the engine's decode speed so far", labels=["slot"]),
            "p_layers": GaugeMetricFamily("edge:peer_layers", "layers a member of the group runs", labels=["slot", "peer"]),
            "p_sent": CounterMetricFamily("edge:peer_sent_bytes", "bytes sent to a member of the group",
                                          labels=["slot", "peer"]),
            "p_recv": CounterMetricFamily("edge:peer_received_bytes", "bytes received from a member of the group",
                                          labels=["slot", "peer"]),
            "p_lost": GaugeMetricFamily("edge:peer_lost", "1 once a member stopped answering", labels=["slot", "peer"]),
            "replans": CounterMetricFamily("edge:group_replans", "times the group was placed again after a loss",
                                           labels=["slot"]),
        }
        for i, m in enumerate(self.models):
            t = m.metrics()
            slot = [str(i)]
            if "cache_hits" in t:
                fams["queries"].add_metric(slot, t["cache_hits"] + t["cache_misses"])
                fams["hits"].add_metric(slot, t["cache_hits"])
                fams["ssd"].add_metric(slot, t["bytes_read"])
            fams["resident"].add_metric(slot, t.get("resident_bytes", 0))
            if t.get("memory_budget_bytes"):
                fams["budget"].add_metric(slot, t["memory_budget_bytes"])
            if t.get("stack_blocks") is not None:
                fams["stack"].add_metric(slot, t["stack_blocks"])
            for layer, x in enumerate(t.get("per_layer", [])):
                fams["lq"].add_metric(slot + [str(layer)], x["hits"] + x["misses"])
                fams["lh"].add_metric(slot + [str(layer)], x["hits"])
            for bits, n in t.get("bits_histogram", {}).items():
                fams["bits"].add_metric(slot + [str(bits)], n)
            if t.get("decode_tokens_per_s"):
                fams["tps"].add_metric(slot, t["decode_tokens_per_s"])
            for p in t.get("peers", []):  # a model run across a group (edge.d2d.backend)
                who = slot + [p["peer"]]
                fams["p_layers"].add_metric(who, p["layers"])
                fams["p_sent"].add_metric(who, p["sent_bytes"])
                fams["p_recv"].add_metric(who, p["received_bytes"])
                fams["p_lost"].add_metric(who, 1.0 if p["lost"] else 0.0)
            if "replans" in t:
                fams["replans"].add_metric(slot, t["replans"])
        yield from fams.values()


class ServerMetrics:
    def __init__(self, admission_gauges, models: list):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("edge:time_to_first_token_seconds", "request arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("edge:inter_token_latency_seconds", "time between tokens of one generation",
                             buckets=GAP_BUCKETS, registry=r)
        self.e2e = Histogram("edge:e2e_request_latency_seconds", "request arrival to its end", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter("edge:prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("edge:generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("edge:requests", "requests by outcome", ["outcome"], registry=r)
        running = Gauge("edge:num_requests_running", "requests generating now", registry=r)
        waiting = Gauge("edge:num_requests_waiting", "requests waiting for a slot", registry=r)
        running.set_function(lambda: admission_gauges()[0])
        waiting.set_function(lambda: admission_gauges()[1])
        r.register(EngineCollector(models))
