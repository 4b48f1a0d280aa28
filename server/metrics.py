"""Prometheus metrics (prometheus-client), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pad_requests", "Generation requests (chat, completions, responses) by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("pad_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("pad_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "pad_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "pad_inter_token_latency_seconds", "Time between tokens of a request", buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("pad_requests_in_flight", "Requests sent to the worker and not finished", registry=r)
        self.queue_depth = Gauge("pad_queue_depth", "Requests waiting in the worker", registry=r)
        self.running_requests = Gauge("pad_running_requests", "Requests in the running batch", registry=r)
        self.running_rows = Gauge("pad_running_rows", "Model rows (base + reward) in the running batch", registry=r)
        self.worker_up = Gauge("pad_worker_up", "1 when the worker is loaded and answering", registry=r)
        self.worker_restarts = Counter("pad_worker_restarts", "Times a local worker was restarted", registry=r)
        # Prefix cache (vLLM's prefix_cache_queries / _hits): prompt tokens of
        # new rows looked up, and those found cached (their prefill skipped).
        self.prefix_cache_queries = Counter(
            "pad_prefix_cache_queries", "Prompt tokens of new rows looked up in the prefix cache", registry=r)
        self.prefix_cache_hits = Counter(
            "pad_prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled again)", registry=r)
        self.prefix_cache_bytes = Gauge("pad_prefix_cache_bytes", "Bytes of KV the prefix cache holds", registry=r)
        self._worker_totals: dict[str, int] = {}  # the last totals of...
        self._totals_instance: str | None = None  # ...this worker instance

    def update_worker_stats(self, stats: dict, instance: str | None = None) -> None:
        """The worker's stats: gauges as they are; totals since the worker
        `instance` started, of which the counters add what is new (all of it
        from a new instance). Empty stats (the worker is gone) zero the
        gauges and leave the counters."""
        self.queue_depth.set(stats.get("waiting_requests", 0))
        self.running_requests.set(stats.get("running_requests", 0))
        self.running_rows.set(stats.get("running_rows", 0))
        self.prefix_cache_bytes.set(stats.get("prefix_cache_bytes", 0))
        if instance != self._totals_instance and stats:
            self._worker_totals, self._totals_instance = {}, instance
        for name, counter in (("prefix_cache_queried_tokens", self.prefix_cache_queries),
                              ("prefix_cache_hit_tokens", self.prefix_cache_hits)):
            if name in stats:
                total = stats[name]
                counter.inc(max(total - self._worker_totals.get(name, 0), 0))
                self._worker_totals[name] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
