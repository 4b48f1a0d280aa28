"""SageMaker's serving contract (server/invocations.py), over real HTTP in
front of the worker loop on the tiny engine: POST /invocations answers a
chat, a completion or a Responses request as its own endpoint does, streamed
or not, with that endpoint's errors, key and metrics; a body naming no
endpoint is an OpenAI-shaped 400; GET and POST /ping are /health."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with worker_thread() as (address, _worker):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("invocations"),
                                  api_keys=["secret"])
        with uvicorn_server(create_app(settings)) as url:
            yield url


def post(server: str, path: str, body, key: str | None = "secret") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server}{path}", content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize(("body", "path", "kind"), [
    (CHAT, "/v1/chat/completions", "chat.completion"),
    ({"model": MODEL, "prompt": "Hi", "max_tokens": 5, "temperature": 0}, "/v1/completions", "text_completion"),
    ({"model": MODEL, "input": "Hi", "max_output_tokens": 5, "temperature": 0, "store": False}, "/v1/responses",
     "response"),
    ({"model": MODEL, "input": "Hi", "prompt": None, "max_output_tokens": 5, "temperature": 0, "store": False},
     "/v1/responses", "response"),  # a Responses request's own (null) prompt
])
def test_each_kind_of_body_is_answered_as_its_endpoint_answers_it(server, body, path, kind):
    invoked, direct = post(server, "/invocations", body), post(server, path, body)
    assert invoked.status_code == direct.status_code == 200, invoked.text
    assert invoked.json()["object"] == kind
    strip = ("id", "created", "created_at", "output")  # fresh per answer (a response's items carry its id)
    assert {k: v for k, v in invoked.json().items() if k not in strip} == \
           {k: v for k, v in direct.json().items() if k not in strip}


def test_a_preference_and_a_stream_go_through(server):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "preference": "short answers"}
    with httpx.stream("POST", f"{server}/invocations", json=body, headers={"Authorization": "Bearer secret"},
                      timeout=60) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        chunks = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and json.loads(chunks[-2][6:])["usage"]["completion_tokens"] == 5
    assert json.loads(chunks[0][6:])["pad"]["preferences"] == [{"text": "short answers", "weight": 1.0}]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "tokens": [1, 2]}, 400, None),  # names no endpoint
    (b"not json", 400, None),
    (b"[1, 2]", 400, None),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),  # the endpoint's own validation
    ({**CHAT, "model": "nope"}, 404, "model"),
    ({"model": MODEL, "input": "Hi", "background": True, "store": False}, 400, "background"),
])
def test_bad_bodies_get_the_errors_of_the_endpoint_or_a_400(server, body, status, param):
    answer = post(server, "/invocations", body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param
    if isinstance(body, dict) and "tokens" in body:
        assert "`messages` (/v1/chat/completions)" in answer.json()["error"]["message"]


def test_the_key_is_checked_and_the_request_is_counted_as_its_endpoints(server):
    assert post(server, "/invocations", CHAT, key=None).status_code == 401
    assert post(server, "/invocations", CHAT, key="wrong").status_code == 401

    def counted() -> float:
        text = httpx.get(f"{server}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('pad_requests_total{status="200"}'))

    before = counted()
    assert post(server, "/invocations", CHAT).status_code == 200
    assert counted() == before + 1

    def refused(status: str) -> float:
        text = httpx.get(f"{server}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f'pad_requests_total{{status="{status}"}}'))

    too_large = {**CHAT, "messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]}
    before = refused("413"), refused("400")
    assert post(server, "/invocations", too_large).status_code == 413
    assert post(server, "/invocations", {"model": MODEL}).status_code == 400
    assert (refused("413"), refused("400")) == (before[0] + 1, before[1] + 1)


def test_ping_is_health_on_get_and_post(server, tmp_path):
    for method in ("GET", "POST"):
        answer = httpx.request(method, f"{server}/ping")
        assert answer.status_code == 200 and answer.json() == {"status": "ok", "model": MODEL}
    app = create_app(ServerSettings(worker_address="tcp://127.0.0.1:1", data_dir=tmp_path))
    with uvicorn_server(app, healthy=False) as url:
        answer = httpx.get(f"{url}/ping")  # no worker there
        assert answer.status_code == 503 and "Retry-After" in answer.headers
