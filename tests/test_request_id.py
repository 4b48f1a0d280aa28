"""Every answer carries `x-request-id`, as OpenAI's do: the SDKs expose it
(`error.request_id`, `response._request_id`), and a client's own plain
`X-Request-Id` comes back unchanged (vLLM's behaviour), so one id can follow
a request through a proxy and the server's logs."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from server.app import create_app
from server.request_id import request_id_of
from server.settings import ServerSettings

BODY = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}
GENERATED = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture
def app(tmp_path):
    return create_app(ServerSettings(data_dir=tmp_path, max_request_bytes=1024), start_worker=False)


def client(app, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **kwargs), base_url="http://test")


async def test_every_kind_of_answer_has_a_fresh_request_id(app):
    async with client(app) as http:
        answers = [
            await http.get("/health"),  # 503: the worker is not started
            await http.post("/v1/chat/completions", json=BODY),  # 503
            await http.post("/v1/chat/completions", json={**BODY, "n": 0}),  # 400
            await http.post("/v1/chat/completions", content=b"x" * 4000),  # 413, from the body limit
            await http.get("/v1/nothing-here"),  # 404 unknown_url
            await http.get("/openapi.json"),  # 200
        ]
    assert [a.status_code for a in answers] == [503, 503, 400, 413, 404, 200]
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(GENERATED.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)


async def test_a_plain_client_id_is_echoed_and_anything_else_replaced(app):
    async with client(app) as http:
        echoed = await http.get("/health", headers={"X-Request-Id": "trace-42:a.b_c"})
        spaced = await http.get("/health", headers={"X-Request-Id": "two words"})
        long = await http.get("/health", headers={"X-Request-Id": "x" * 129})
    assert echoed.headers["x-request-id"] == "trace-42:a.b_c"
    assert GENERATED.fullmatch(spaced.headers["x-request-id"]) and GENERATED.fullmatch(long.headers["x-request-id"])
    assert len(echoed.headers.get_list("x-request-id")) == 1


def test_request_id_of_refuses_header_injection():
    assert GENERATED.fullmatch(request_id_of({"headers": [(b"x-request-id", b"a\r\nSet-Cookie: x")]}))
    assert GENERATED.fullmatch(request_id_of({"headers": []}))


async def test_an_unhandled_error_is_a_500_with_its_request_id(app, caplog):
    async def boom():
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    async with client(app, raise_app_exceptions=False) as http:
        answer = await http.get("/boom", headers={"X-Request-Id": "find-me"})
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
    assert answer.headers["x-request-id"] == "find-me"
    assert any("find-me" in record.getMessage() for record in caplog.records)


async def test_the_openai_sdk_reports_it(app):
    async with client(app) as http:
        sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(**BODY, n=0)
        with pytest.raises(openai.APIStatusError) as unavailable:
            await sdk.chat.completions.create(**BODY)
    assert GENERATED.fullmatch(bad.value.request_id) and GENERATED.fullmatch(unavailable.value.request_id)
    assert unavailable.value.status_code == 503


async def test_openapi_states_the_header_on_every_answer(app):
    async with client(app) as http:
        schema = (await http.get("/openapi.json")).json()
    responses = [r for path in schema["paths"].values() for op in path.values() for r in op["responses"].values()]
    assert responses and all("x-request-id" in r["headers"] for r in responses)
