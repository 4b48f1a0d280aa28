"""/metrics under vLLM's names too (server/metrics.py VllmNames): the
gauges, counters and histograms a vLLM dashboard, alert or autoscaler reads
(vllm:num_requests_waiting, vllm:kv_cache_usage_perc, ...), labelled
model_name and engine, each the same measurement as ours; and the engine's
KV usage they report (pad_core runners' kv_usage)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import uvicorn_server, worker_thread

from pad_core.settings import EngineSettings
from pad_core.testing import tiny_engine
from pad_core.types import ChatRequest, Preference, SamplingParams, StepOutput
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
    assert value(samples, "vllm:generation_tokens_total", **LABELS) == value(samples, "pad_generation_tokens_total") \
        >= 12 + 1, "the answers' tokens, and those the hung-up stream was sent"
    assert value(samples, "vllm:prompt_tokens_total", **LABELS) == value(samples, "pad_prompt_tokens_total") > 0
    assert value(samples, "vllm:e2e_request_latency_seconds_count", **LABELS) == 3
    for phase in ("queue", "prefill", "decode", "inference"):  # the engine's phases of the 3 finished answers
        assert value(samples, f"vllm:request_{phase}_time_seconds_count", **LABELS) == 3, phase
    assert value(samples, "vllm:request_prefill_time_seconds_sum", **LABELS) > 0
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


# ---- every request counted once, however it ends ---------------------------------
def value_or_0(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def success(samples: dict, reason: str) -> float:
    return value_or_0(samples, "vllm:request_success_total", finished_reason=reason, **LABELS)


def settle(url: str, done, timeout: float = 5.0) -> dict:
    """Scrapes until `done(samples)` (or the time is up); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def idle(samples: dict) -> bool:
    return value_or_0(samples, "pad_running_requests") == 0 and value_or_0(samples, "pad_queue_depth") == 0


def test_a_request_hung_up_on_while_it_waits_in_the_queue_counts_as_abort(tmp_path):
    """(Found in review.) Generation.start: a client that leaves before the
    first token (its request queued behind a full batch) cancels start(),
    which counts nothing; only hang-ups after the first token reach
    count_unfinished(..., "abort"). vLLM (and pad_request_success's own
    "abort: the client went away") counts every request the client left."""
    engine = tiny_engine(EngineSettings(max_running_requests=1))
    with worker_thread(engine=engine, step_delay=0.05) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
        first = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                                           json={**chat, "max_tokens": 40}))
        first.start()
        time.sleep(0.5)  # the first request holds the batch's one place
        try:
            httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 4}, timeout=0.5)
        except httpx.TimeoutException:
            pass  # queued behind the first: the client gives up and hangs up
        first.join(60)
        samples = settle(url, lambda s: idle(s) and success(s, "length") >= 1 and success(s, "abort") >= 1)
    assert success(samples, "length") == 1
    assert success(samples, "abort") == 1, "the request whose client left while it was queued is counted nowhere"


def test_an_engine_error_on_the_first_token_counts_as_error(tmp_path):
    """(Found in review.) Generation.start raised the engine's failure of a first output without
    counting it; the same failure one token later is counted "error"
    (Generation.collect / stream_events). vLLM counts a request-level engine
    error as finished_reason "error" wherever it happens."""
    engine = tiny_engine()
    choose = engine._choose

    def failing(states, hidden):  # a bug the request reaches at its first token
        if any(not state.generated for state in states):
            raise RuntimeError("injected fault")
        return choose(states, hidden)

    engine._choose = failing
    with worker_thread(engine=engine) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert response.status_code == 500, response.text
        samples = settle(url, idle)
    assert value_or_0(samples, "pad_requests_total", status="500") == 1
    assert success(samples, "error") == 1, "an engine error at the first token is counted nowhere"


def test_a_choice_that_finished_is_not_counted_as_abort_when_the_client_leaves(tmp_path):
    """(Found in review.) stream_events (and Generation.collect) counted every choice of a request
    the client left as "abort", also those that had already finished (their
    answer sent whole, finish_reason "stop"); each choice is an engine
    request (as vLLM's n / several prompts), counted by its own end: here
    one stop and one abort, not two aborts."""
    with worker_thread(step_delay=0.03) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        # Greedy on the tiny model: the first prompt writes "pel" at its second token, the second never.
        body = {"model": MODEL, "prompt": ["Hello there", "The cat sat"], "max_tokens": 300, "temperature": 0,
                "stop": ["pel"], "stream": True}
        finished = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as events:
            for line in events.iter_lines():
                if line.startswith("data: {"):
                    chunk = httpx.Response(200, content=line[len("data: "):]).json()
                    finished += [(c["index"], c["finish_reason"]) for c in chunk["choices"] if c["finish_reason"]]
                if finished:
                    break  # choice 0 is done (stop); choice 1 still writing: hang up
        assert finished == [(0, "stop")], finished
        samples = settle(url, lambda s: idle(s) and success(s, "abort") + success(s, "stop") >= 2)
    assert (success(samples, "stop"), success(samples, "abort")) == (1, 1)


def test_tokens_generated_before_a_hang_up_count_in_generation_tokens(tmp_path):
    """(Found in review.) Metrics.count_finished was the only place prompt_tokens /
    generation_tokens grow, so a request the client left (or that failed)
    adds none of the tokens it was sent: vllm:generation_tokens_total
    ("Number of generation tokens processed", counted by vLLM at every
    engine step, aborted requests' included) under-reads throughput."""
    with worker_thread(step_delay=0.03) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300,
                "temperature": 0, "stream": True}
        received = 0
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as events:
            for line in events.iter_lines():
                chunk = json.loads(line[len("data: "):]) if line.startswith("data: {") else {}
                if any(choice["delta"].get("content") for choice in chunk.get("choices", ())):
                    received += 1
                if received == 6:
                    break  # six tokens sent; hang up
        samples = settle(url, lambda s: idle(s) and success(s, "abort") == 1)
    assert success(samples, "abort") == 1
    assert value_or_0(samples, "vllm:generation_tokens_total", **LABELS) >= received, \
        "the tokens the client was sent are not counted as generated"


def test_kv_usage_counts_a_prompt_being_written_in_pieces():
    """(Found in review.) TransformersRunner.kv_usage counted the batch's rows
    only; a prompt written in pieces (chunked prefill, the default) holds its
    KV outside the batch (`_partial`) for as many steps as it has pieces, and
    the gauge reads 0 all that time (the slots runner counts its slot)."""
    engine = tiny_engine(EngineSettings(backend="transformers", kv_pool_gib=0.002, max_prefill_tokens=16))
    request = ChatRequest("r", [{"role": "user", "content": "word " * 150}], [],
                          SamplingParams(max_tokens=4, temperature=0))
    engine.add_chat(request)
    for _ in range(4):
        engine.step()
    runner = engine.runners["base"]
    assert engine.prefilling and runner._partial, "the prompt is still being written"
    held = sum(tokens for tokens, _ in runner._partial.values())
    assert held >= 48
    assert engine.stats()["kv_cache_usage"] > 0, f"{held} prompt tokens' KV held, usage reads 0"


def test_the_last_output_reports_the_phases_the_request_reached():
    """queue (added to admitted), prefill (to the first token), decode (to
    the last): measured in the engine, sent on the last output; a request
    aborted while it waited reports its queue time alone."""
    engine = tiny_engine(EngineSettings(max_running_requests=1))
    for request_id in ("first", "second"):
        engine.add_chat(ChatRequest(request_id, [{"role": "user", "content": "Hi"}], [],
                                    SamplingParams(max_tokens=3, temperature=0)))
    engine.step()  # "first" admitted; "second" waits behind it
    engine.abort("second")
    last = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                last[output.request_id] = output
    assert set(last["first"].phase_seconds) == {"queue", "prefill", "decode"}
    assert last["first"].phase_seconds["prefill"] > 0 and last["first"].phase_seconds["decode"] > 0
    assert set(last["second"].phase_seconds) == {"queue"} and last["second"].phase_seconds["queue"] > 0
    assert StepOutput.from_dict(last["first"].to_dict()).phase_seconds == last["first"].phase_seconds
