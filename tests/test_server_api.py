"""The server as a team would use it: a real `pad serve` process on the
embedded model, driven by the official openai SDK (sync and async), plus
every error status triggered for real, dropped streams, a killed worker and
16 concurrent streaming clients. (API keys, the queue limit and CORS are
tested over real HTTP on the tiny engine, in test_server_http.py.)"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server.tools.local_server import free_port, wait_healthy

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "How do I sleep better?"}]
PREFERENCE = "I like short answers with a bit of humour"


class Server:
    def __init__(self, tmp_path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "PAD_DTYPE": "float32", "PAD_DATA_DIR": str(tmp_path), **(env or {})}
        self.log = open(tmp_path / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 240) -> None:
        wait_healthy(self.url, self.process, timeout)

    def worker_pid(self) -> int:
        children = open(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read().split()
        return int(children[0])

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(match.group(1))

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("server"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask(client, **kwargs):
    params = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    return client.chat.completions.create(**{**params, **kwargs})


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["reward_models"] == ["self"]
    extra = models.data[0].model_extra  # vLLM's card too: clients size prompts by max_model_len
    assert extra["max_model_len"] == extra["context_length"] > 0 and extra["root"] == MODEL


def test_completion_parses_and_usage_adds_up(client):
    answer = ask(client)
    assert answer.object == "chat.completion" and answer.model == MODEL
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 16
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_preference_through_extra_body_changes_the_answer_and_w0_is_plain(client):
    plain = ask(client, max_tokens=24).choices[0].message.content
    personalized = ask(client, max_tokens=24, extra_body={"preference": PREFERENCE}).choices[0].message.content
    weightless = ask(client, max_tokens=24, extra_body={"preference": PREFERENCE, "pad": {"weight": 0}})
    assert personalized != plain
    assert weightless.choices[0].message.content == plain
    weighted = ask(client, max_tokens=24, extra_body={"preference": [{"text": PREFERENCE, "weight": 2.0}], "pad": {"top_k": 5}})
    assert weighted.model_extra["pad"]["preferences"] == [{"text": PREFERENCE, "weight": 2.0}]


def test_a_chats_later_turns_come_from_the_prefix_cache(server, client):
    """A 3-turn conversation with a preference, each turn sending the
    model's own answers back: the cache serves at least each earlier
    turn's prompt to both rows (base and reward), and a turn asked again
    (served almost whole from the cache) answers the same tokens (float32)."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    earlier = 0
    for turn in ("How do I sleep better?", "And what about naps?", "Thanks. One more tip?"):
        messages = [*messages, {"role": "user", "content": turn}]
        before = server.metric("pad_prefix_cache_hits_total")
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                extra_body={"preference": PREFERENCE})
        assert server.metric("pad_prefix_cache_hits_total") - before >= earlier // 32 * 32 * 2
        again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                               extra_body={"preference": PREFERENCE})
        assert again.choices[0].message.content == answer.choices[0].message.content
        earlier = answer.usage.prompt_tokens
        messages = [*messages, {"role": "assistant", "content": answer.choices[0].message.content}]
    assert server.metric("pad_prefix_cache_bytes") > 0


def test_streaming_equals_non_streaming_and_reports_usage(client):
    answer = ask(client, extra_body={"preference": PREFERENCE})
    expected = answer.choices[0].message.content
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}, extra_body={"preference": PREFERENCE}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [answer.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
    assert 0 < answer.usage.completion_tokens <= 16


async def test_async_client_streaming_and_not(server):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    answer = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == answer.choices[0].message.content
    models = await client.models.list()
    assert models.data[0].id == MODEL


def test_n_seed_stop_logprobs(client):
    answer = ask(client, n=2, temperature=1.0, seed=3, max_tokens=8)
    again = ask(client, n=2, temperature=1.0, seed=3, max_tokens=8)
    assert [c.message.content for c in answer.choices] == [c.message.content for c in again.choices]
    assert answer.usage.completion_tokens == sum(1 for _ in range(2)) * 8
    stopped = ask(client, stop=[" "], max_tokens=16)
    assert stopped.choices[0].finish_reason == "stop" and " " not in stopped.choices[0].message.content
    with_logprobs = ask(client, logprobs=True, top_logprobs=2, max_tokens=4)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "nope"}, 404, "model", "model_not_found"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "custom"}}, 400,
         "tool_choice", "unsupported_parameter"),
        ({"frobnicate": 1}, 400, "frobnicate", "unknown_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "messages[0].content[0]", "unsupported_content"),
        ({"max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
        ({"temperature": -1}, 400, "temperature", None),
        ({"pad": {"reward_model": "nope"}, "preference": "x"}, 400, "pad.reward_model", "model_not_found"),
        ({"pad": {"top_k": 0}}, 400, "pad.top_k", None),
        ({"pad": {"min_p": 1.5}}, 400, "pad.min_p", None),
        ({"messages": []}, 400, "messages", None),
    ],
)
def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, client, body, status, param, code):
    request = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **body}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert ask(client, max_tokens=2).choices[0].message.content


def test_dropped_stream_frees_its_rows(server, client):
    stream = ask(client, stream=True, max_tokens=400, extra_body={"preference": PREFERENCE})
    for _, _chunk in zip(range(3), stream):
        pass
    assert server.metric("pad_running_rows") == 2  # base row + one reward row
    stream.response.close()
    deadline = time.monotonic() + 10
    while server.metric("pad_running_rows") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("pad_running_rows") == 0


def test_sixteen_concurrent_streaming_clients(server):
    async def one(client, index: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Give me tip number {index} for sleeping."}],
            max_tokens=12, temperature=0, stream=True,
            extra_body={"preference": PREFERENCE} if index % 2 else {},
        )
        parts, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(run())
    assert all(text and finish in ("stop", "length") for text, finish in results)


def test_killed_worker_fails_in_flight_requests_cleanly_and_service_resumes(server, client):
    stream = ask(client, stream=True, max_tokens=400)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    os.kill(server.worker_pid(), signal.SIGKILL)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    health = httpx.get(f"{server.url}/health")
    assert health.status_code in (200, 503)
    if health.status_code == 503:
        assert health.json()["status"] in ("down", "starting")
    server.wait_healthy()
    assert ask(client, max_tokens=4).choices[0].message.content
    assert server.metric("pad_worker_restarts_total") >= 1
