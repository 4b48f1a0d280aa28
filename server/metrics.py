"""Prometheus metrics (prometheus-client), one registry per app: ours
(pad_*), and the same under vLLM's names (vllm:*, labelled model_name and
engine), so dashboards, alerts and autoscalers built on a vLLM server read
this one unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# An answer's finish reason -> vLLM's finished_reason (a tool call is a stop to the engine).
FINISHED_REASONS = {"stop": "stop", "tool_calls": "stop", "function_call": "stop", "length": "length"}


class Metrics:
    def __init__(self, model_name: Callable[[], str] = lambda: "") -> None:
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
        self.kv_cache_usage = Gauge("pad_kv_cache_usage", "Share (0 to 1) of the KV memory the fullest runner "
                                    "may hold that its rows hold", registry=r)
        # Per request (per choice: each is an engine request), as vLLM's request-level histograms.
        self.request_success = Counter("pad_request_success", "Choices finished, by finished_reason (stop, length, "
                                       "abort: the client went away, error)", ["finished_reason"], registry=r)
        self.e2e_request_latency = Histogram("pad_e2e_request_latency_seconds", "Time from a request's arrival to "
                                             "its last token", buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("pad_request_prompt_tokens", "Prompt tokens of a finished request",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("pad_request_generation_tokens", "Tokens a finished choice "
                                                   "generated", buckets=TOKEN_BUCKETS, registry=r)
        # The engine's phases of a finished request (vLLM's request_*_time_seconds).
        self.phase_times = {phase: Histogram(f"pad_request_{phase}_time_seconds", description,
                                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
                            for phase, description in PHASES.items()}
        for reason in ("stop", "length", "abort", "error"):  # every series from the start: rate() sees the first
            self.request_success.labels(finished_reason=reason)
        r.register(VllmNames(self, model_name))
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
        self.kv_cache_usage.set(stats.get("kv_cache_usage", 0))
        if instance != self._totals_instance and stats:
            self._worker_totals, self._totals_instance = {}, instance
        for name, counter in (("prefix_cache_queried_tokens", self.prefix_cache_queries),
                              ("prefix_cache_hit_tokens", self.prefix_cache_hits)):
            if name in stats:
                total = stats[name]
                counter.inc(max(total - self._worker_totals.get(name, 0), 0))
                self._worker_totals[name] = total

    def count_ended(self, choices, prompt_tokens: int, started: float, unfinished: str) -> None:
        """A request's choices once it ended: each that finished by its
        reason (with its lengths, and its latency from `started`,
        perf_counter seconds), each other one as `unfinished` ("abort",
        "error"); and the prompt tokens read. (Generated tokens are counted
        as they come, Timing.tick.)"""
        self.prompt_tokens.inc(prompt_tokens)
        now = time.perf_counter()
        for choice in choices:
            if choice.finish_reason is None:
                self.request_success.labels(finished_reason=unfinished).inc()
                continue
            self.request_success.labels(finished_reason=FINISHED_REASONS.get(choice.finish_reason, "stop")).inc()
            self.request_prompt_tokens.observe(choice.prompt_tokens)
            self.request_generation_tokens.observe(choice.completion_tokens)
            self.e2e_request_latency.observe((choice.ended_at or now) - started)
            phases = choice.phase_seconds
            for phase, seconds in phases.items():
                if phase in self.phase_times:
                    self.phase_times[phase].observe(seconds)
            if "prefill" in phases:
                self.phase_times["inference"].observe(phases["prefill"] + phases.get("decode", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


PHASES = {"queue": "Time a finished request waited to be admitted",
          "prefill": "Time from a finished request's admission to its first token",
          "decode": "Time from a finished request's first token to its last",
          "inference": "Time from a finished request's admission to its last token (prefill + decode)"}

# Our metric -> vLLM's name of the same measure (vLLM v1's /metrics).
VLLM_NAMES = {
    "running_requests": "vllm:num_requests_running",
    "queue_depth": "vllm:num_requests_waiting",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
    "prompt_tokens": "vllm:prompt_tokens",
    "generation_tokens": "vllm:generation_tokens",
    "request_success": "vllm:request_success",
    "prefix_cache_queries": "vllm:prefix_cache_queries",
    "prefix_cache_hits": "vllm:prefix_cache_hits",
    "time_to_first_token": "vllm:time_to_first_token_seconds",
    "inter_token_latency": "vllm:inter_token_latency_seconds",
    "e2e_request_latency": "vllm:e2e_request_latency_seconds",
    "request_prompt_tokens": "vllm:request_prompt_tokens",
    "request_generation_tokens": "vllm:request_generation_tokens",
}


class VllmNames(Collector):
    """Our metrics again under vLLM's names, at each scrape (one
    measurement, two names: they never disagree), labelled as vLLM labels
    them: model_name (the served name) and engine ("0": one engine)."""

    def __init__(self, metrics: Metrics, model_name: Callable[[], str]) -> None:
        self._metrics = metrics
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        labels = {"model_name": self._model_name(), "engine": "0"}
        mirrored = [(getattr(self._metrics, attribute), name) for attribute, name in VLLM_NAMES.items()]
        mirrored += [(self._metrics.phase_times[phase], f"vllm:request_{phase}_time_seconds") for phase in PHASES]
        for metric, name in mirrored:
            for family in metric.collect():
                renamed = Metric(name, family.documentation, family.type)
                for sample in family.samples:
                    if sample.name.endswith("_created"):  # vLLM leaves creation times out
                        continue
                    renamed.add_sample(name + sample.name[len(family.name):], {**labels, **sample.labels},
                                       sample.value)
                yield renamed
        preemptions = Metric("vllm:num_preemptions", "Preemptions (none here: a request admitted runs to its end)",
                             "counter")
        preemptions.add_sample("vllm:num_preemptions_total", labels, 0.0)
        yield preemptions
