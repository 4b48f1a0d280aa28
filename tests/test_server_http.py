"""The gateway over real HTTP (uvicorn on a local port) in front of a real
worker loop on the tiny engine: API keys (401), the queue limit (429),
CORS, n > 1 fan-out while streaming, and a dropped stream freeing its rows.
The same behaviours on the embedded model are in test_server_api.py."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "How do I sleep better?"}]


@pytest.fixture(scope="module")
def slow_worker():
    """The tiny engine, slowed to ~50 steps/s so a long request stays in flight."""
    with worker_thread(step_delay=0.02) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(slow_worker, tmp_path_factory):
    settings = ServerSettings(worker_address=slow_worker[0], data_dir=tmp_path_factory.mktemp("guarded"),
                              api_keys=["secret", "other:bob"], max_queue=1, cors_origins=["https://app.example"])
    with uvicorn_server(create_app(settings)) as url:
        yield url


def test_api_keys(guarded):
    url = f"{guarded}/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic secret"}):
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{guarded}/v1/models").status_code == 401
    assert httpx.get(f"{guarded}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{guarded}/metrics").status_code == 200
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key="secret", max_retries=0)
    assert client.chat.completions.create(**body).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="nope", max_retries=0).models.list()


def test_queue_limit_is_a_429_and_the_server_keeps_serving(guarded):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key="secret", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=400, stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert limited.value.status_code == 429 and limited.value.body["code"] == "queue_full"
    assert limited.value.response.headers["retry-after"] == "1"
    # n above max_queue could never be served: a 400, not a 429 to retry forever
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=2)
    assert too_many.value.body["param"] == "n"
    stream.response.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            break
        except openai.RateLimitError:  # the dropped stream is being aborted
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert answer.choices[0].finish_reason == "length"


def test_cors(guarded):
    preflight = httpx.options(
        f"{guarded}/v1/chat/completions",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{guarded}/v1/chat/completions",
                          headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    with worker_thread() as (address, worker), uvicorn_server(
        create_app(ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("open")))
    ) as url:
        yield url, worker


async def test_streaming_fan_out_of_n_choices(open_server):
    client = openai.AsyncOpenAI(base_url=f"{open_server[0]}/v1", api_key="unused", max_retries=0)
    params = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "n": 3, "seed": 7, "temperature": 1.0,
              "extra_body": {"preference": "short answers"}}
    whole = await client.chat.completions.create(**params)
    stream = await client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = ["", "", ""], [None] * 3, None
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in whole.choices]  # seeds seed+i: the same answers
    assert finishes == ["length"] * 3 and usage.completion_tokens == 18 == whole.usage.completion_tokens
    assert len(set(texts)) > 1  # different seeds per choice


def test_a_dropped_stream_frees_its_rows(open_server):
    url, worker = open_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=450, stream=True,
                                            extra_body={"preference": ["short answers", "humour"]})
    next(iter(stream))
    stream.response.close()
    deadline = time.monotonic() + 10
    while worker.engine.stats()["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.engine.stats()["running_rows"] == 0
    assert 'pad_requests_total{status="499"}' in httpx.get(f"{url}/metrics").text


async def test_the_pool_backend_with_chunked_prefill_serves_the_reference_answers(tmp_path):
    """The gateway over a worker on the slots backend writing prompts in
    16-token pieces: concurrent streamed PAD and plain answers are the
    transformers runner's, and a stream dropped while its prompt is still
    being written frees its rows."""
    import asyncio

    from pad_core.settings import EngineSettings
    from pad_core.testing import tiny_engine

    async def answers(url: str) -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        async def one(preference, question):
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0,
                stream=True, extra_body={"preference": preference, "ignore_eos": True})
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

        questions = ["How do I sleep better?", "Tell me about gardening and compost. " * 8, "Hi"]
        return await asyncio.gather(*(one(pref, q) for pref in (None, ["short answers", "humour"]) for q in questions))

    results = []
    for settings in (EngineSettings(), EngineSettings(backend="slots", kv_pool_gib=0.03, max_prefill_tokens=16)):
        engine = tiny_engine(settings)
        with worker_thread(engine=engine) as (address, worker), uvicorn_server(
            create_app(ServerSettings(worker_address=address, data_dir=tmp_path / settings.backend))
        ) as url:
            results.append(await answers(url))
            if settings.backend == "slots":
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                stream = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Tell me about compost. " * 40}],
                    max_tokens=50, stream=True, extra_body={"preference": "short answers"})
                stream.response.close()  # before its first token: the prompt is still being written
                # Poll for the whole drained state, not the rows alone: a prompt still
                # being written may hold no rows yet while its request is running.
                drained = {"running_requests": 0, "running_rows": 0, "waiting_requests": 0}.items()
                deadline = time.monotonic() + 10
                while not worker.engine.stats().items() >= drained and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert worker.engine.stats().items() >= drained
    assert results[1] == results[0] and all(results[0])
