"""/metrics under vLLM's names too (server/metrics.py VllmNames): the
gauges, counters and histograms a vLLM dashboard, alert or autoscaler reads
(vllm:num_requests_waiting, vllm:kv_cache_usage_perc, ...), labelled
model_name and engine, each the same measurement as ours; and the engine's
KV usage they report (pad_core runners' kv_usage)."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import uvicorn_server, worker_thread

from pad_core.settings import EngineSettings
from pad_core.testing import tiny_engine
from pad_core.types import ChatRequest, Preference, SamplingParams
from server.app import create_app
from server.metrics import VLLM_NAMES, Metrics
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
LABELS = {"model_name": MODEL, "engine": "0"}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, its labels) -> value, of every sample on /metrics."""
    return samples_of(httpx.get(f"{url}/metrics", timeout=10).text)


def samples_of(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted({**labels}.items())))]


def test_every_vllm_metric_mirrors_ours_at_each_scrape(tmp_path):
    with worker_thread() as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={**chat, "n": 1, "stream": True}) as events:
            assert events.status_code == 200 and list(events.iter_lines())
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={**chat, "n": 1, "stream": True, "max_tokens": 200}) as events:
            next(events.iter_lines())  # then hangs up
        for _ in range(100):  # the hung-up stream is counted as its task ends; the gauges follow the worker's stats
            text = httpx.get(f"{url}/metrics", timeout=10).text
            samples = samples_of(text)
            if value(samples, "pad_request_success_total", finished_reason="abort") == 1 and \
                    value(samples, "pad_running_requests") == 0:
                break
            time.sleep(0.05)
    assert value(samples, "vllm:request_success_total", finished_reason="length", **LABELS) == 3
    assert value(samples, "vllm:request_success_total", finished_reason="abort", **LABELS) == 1
    assert value(samples, "vllm:generation_tokens_total", **LABELS) == 12 == value(
        samples, "pad_generation_tokens_total")
    assert value(samples, "vllm:prompt_tokens_total", **LABELS) == value(samples, "pad_prompt_tokens_total") > 0
    assert value(samples, "vllm:e2e_request_latency_seconds_count", **LABELS) == 3
    assert value(samples, "vllm:request_generation_tokens_sum", **LABELS) == 12
    assert value(samples, "vllm:request_generation_tokens_bucket", le="5.0", **LABELS) == 3
    assert value(samples, "vllm:time_to_first_token_seconds_count", **LABELS) == value(
        samples, "pad_time_to_first_token_seconds_count") >= 3
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert value(samples, gauge, **LABELS) == 0, f"{gauge} once the server idles"
    assert value(samples, "vllm:num_preemptions_total", **LABELS) == 0
    assert not [name for name, _ in samples if name.startswith("vllm:") and name.endswith("_created")]
    families = {family.name for family in text_string_to_metric_families(text)}
    assert families >= set(VLLM_NAMES.values()), "every vLLM name, once something was measured"


def test_the_model_name_label_is_the_served_name_before_a_worker_answers():
    metrics = Metrics(lambda: "my-model")
    metrics.update_worker_stats({"waiting_requests": 3, "kv_cache_usage": 0.25})
    assert metrics.registry.get_sample_value("vllm:num_requests_waiting", {"model_name": "my-model",
                                                                            "engine": "0"}) == 3
    assert metrics.registry.get_sample_value("vllm:kv_cache_usage_perc", {"model_name": "my-model",
                                                                          "engine": "0"}) == 0.25


@pytest.mark.parametrize("backend", ["transformers", "slots"])
def test_kv_usage_rises_while_rows_run_and_falls_back_to_zero(backend):
    engine = tiny_engine(EngineSettings(backend=backend, kv_pool_gib=0.02, max_running_requests=4))
    assert engine.stats()["kv_cache_usage"] == 0
    request = ChatRequest("r", [{"role": "user", "content": "Hi there"}], [Preference("be brief")],
                          SamplingParams(max_tokens=6, temperature=0))  # PAD: base and reward rows
    engine.add_chat(request)
    usages = []
    while engine.has_unfinished():
        engine.step()
        usages.append(engine.stats()["kv_cache_usage"])
    assert 0 < max(usages) <= 1, usages
    assert engine.stats()["kv_cache_usage"] == 0
