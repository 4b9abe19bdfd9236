"""Prometheus metrics of the server (prometheus-client, one registry per server; names prefixed `dsv4:`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("dsv4:num_requests_running", "sequences in the batch", registry=r)
        self.waiting = Gauge("dsv4:num_requests_waiting", "sequences queued", registry=r)
        self.prompt_tokens = Counter("dsv4:prompt_tokens", "prompt tokens prefilled (cache hits excluded)", registry=r)
        self.generation_tokens = Counter("dsv4:generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("dsv4:time_to_first_token_seconds", "submit to first token", buckets=_LAT, registry=r)
        self.itl = Histogram("dsv4:inter_token_latency_seconds", "between two tokens of a sequence",
                             buckets=_LAT, registry=r)
        self.cache_queries = Counter("dsv4:prefix_cache_queries", "prefix-cache lookups", registry=r)
        self.cache_hits = Counter("dsv4:prefix_cache_hits", "lookups that reused a cached prefix", registry=r)
        self.cached_tokens = Counter("dsv4:prefix_cache_cached_tokens", "prompt tokens served from the cache",
                                     registry=r)
        self.state_bytes = Gauge("dsv4:state_memory_bytes", "sequence state held by running requests", registry=r)
        self.cache_bytes = Gauge("dsv4:prefix_cache_bytes", "bytes held by the prefix cache", registry=r)
        self.spec_drafted = Counter("dsv4:spec_decode_draft_tokens", "tokens drafted by the MTP block", registry=r)
        self.spec_accepted = Counter("dsv4:spec_decode_accepted_tokens", "drafted tokens the main model kept",
                                     registry=r)
        self.requests = Counter("dsv4:requests", "finished sequences (one per choice) by finish reason", ["reason"],
                                registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe_n(hist: Histogram, amount: float, n: int) -> None:
    """`n` observations of `amount` in one update (a decode step's tokens share their inter-token latency):
    the sum grows by n * amount and amount's bucket by n, as n `observe` calls would do (prometheus-client
    keeps per-bucket counts and cumulates them when scraped; without those internals: n calls). n = 1 takes
    the same route: `observe` without its exemplar and label checks (a c1 decode step's one observation)."""
    buckets, bounds = getattr(hist, "_buckets", None), getattr(hist, "_upper_bounds", None)
    if buckets is None or bounds is None or len(buckets) != len(bounds):
        for _ in range(n):
            hist.observe(amount)
        return
    hist._sum.inc(amount * n)
    for i, bound in enumerate(bounds):
        if amount <= bound:
            buckets[i].inc(n)
            break
