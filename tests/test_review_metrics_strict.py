"""Review of a69f11b (/metrics under vLLM's names): requests and tokens the
new per-request counters miss or miscount, and a KV usage that reads 0
while a prompt's KV is held. Each test fails on the reviewed code."""

from __future__ import annotations

import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import uvicorn_server, worker_thread

from pad_core.settings import EngineSettings
from pad_core.testing import tiny_engine
from pad_core.types import ChatRequest, SamplingParams
from server.app import create_app
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
LABELS = {"model_name": MODEL, "engine": "0"}


def samples_of(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    return samples_of(httpx.get(f"{url}/metrics", timeout=10).text)


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def success(samples: dict, reason: str) -> float:
    return value(samples, "vllm:request_success_total", finished_reason=reason, **LABELS)


def settle(url: str, done, timeout: float = 5.0) -> dict:
    """Scrapes until `done(samples)` (or the time is up); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def idle(samples: dict) -> bool:
    return value(samples, "pad_running_requests") == 0 and value(samples, "pad_queue_depth") == 0


def test_a_request_hung_up_on_while_it_waits_in_the_queue_counts_as_abort(tmp_path):
    """server/generation.py Generation.start: a client that leaves before the
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
    """Generation.start raises the engine's failure of a first output without
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
    assert value(samples, "pad_requests_total", status="500") == 1
    assert success(samples, "error") == 1, "an engine error at the first token is counted nowhere"


def test_a_choice_that_finished_is_not_counted_as_abort_when_the_client_leaves(tmp_path):
    """stream_events (and Generation.collect) count every choice of a request
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
    """Metrics.count_finished is the only place prompt_tokens /
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
                if '"content": "' in line:
                    received += 1
                if received == 6:
                    break  # six tokens sent; hang up
        samples = settle(url, lambda s: idle(s) and success(s, "abort") == 1)
    assert success(samples, "abort") == 1
    assert value(samples, "vllm:generation_tokens_total", **LABELS) >= received, \
        "the tokens the client was sent are not counted as generated"


def test_kv_usage_counts_a_prompt_being_written_in_pieces():
    """pad_core/runner.py TransformersRunner.kv_usage counts the batch's rows
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
