"""Issue 14's hostile inputs, each against the real gateway (uvicorn, real
HTTP, one keep-alive client) in front of the real worker loop on the tiny
engine: every one gets a 4xx or a normal answer, never a 500, and a stream
decoding beside them finishes exactly as it would alone."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings
from server.request_body import DRAIN_BYTES

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]
BASE = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
DEEP = 100_000


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def raw(body: dict) -> bytes:
    """JSON with \\uXXXX escapes (httpx's own encoder refuses lone surrogates)."""
    return json.dumps(body, ensure_ascii=True).encode("ascii")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (what is sent, expected status, the parameter a 400 names)
CHAT_CASES = [
    ({"temperature": 1e-40}, 200, None),
    ({"top_p": 0}, 200, None),  # the most likely token alone (OpenAI accepts 0)
    ({"top_p": 1e-50}, 200, None),
    ({"top_p": 5e-324}, 200, None),
    ({"temperature": 1e-40, "top_p": 5e-324, "preference": "short answers"}, 200, None),
    ({"temperature": 2, "top_p": 5e-324, "seed": 2**63 - 1, "n": 2, "preference": "short answers"}, 200, None),
    ({"pad": {"weight": 100.0, "top_k": 100, "min_p": 1.0}, "preference": [{"text": "a", "weight": 100},
                                                                          {"text": "b", "weight": -100}]}, 200, None),
    ({"pad": {"weight": -100.0, "top_k": 1}, "temperature": 2, "preference": "a"}, 200, None),
    ({"presence_penalty": -2, "frequency_penalty": 2, "logprobs": True, "top_logprobs": 20}, 200, None),
    ({"pad": {"weight": 1e308}, "preference": "x"}, 400, "pad.weight"),
    ({"pad": {"weight": -1e308}, "preference": "x"}, 400, "pad.weight"),
    ({"preference": [{"text": "x", "weight": 1e308}]}, 400, "preference[0].weight"),
    ({"preference": ["same", "same"]}, 400, "preference[1]"),
    ({"preference": ["   "]}, 400, "preference[0]"),  # a blank string alone is "off", like ""
    ({"max_tokens": 18446744073709551616}, 400, "max_tokens"),
    ({"seed": -9223372036854775809}, 400, "seed"),
    ({"pad": {"top_k": 10**30}, "preference": "x"}, 400, "pad.top_k"),
    ({"pad": {"top_k": 101}, "preference": "x"}, 400, "pad.top_k"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),
    ({"stop": ["\ud800"]}, 400, "stop[0]"),
    ({"preference": "\udfff"}, 400, "preference"),
    ({"user": "a\ud800b"}, 400, "user"),
    ({"n": 9}, 400, "n"),  # more than max_queue (8): a 429 no retry could cure
    ({"n": 17}, 400, "n"),
    ({"messages": [{"role": "user", "content": "x" * 200_000}]}, 400, "messages"),  # refused before tokenizing
    # integers msgpack cannot carry, inside free-form JSON (a schema): a 400, not an OverflowError
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "array", "minItems": 2**64}}}}, 400, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"maximum": -(2**70)}}}],
      "tool_choice": "required"}, 400, "tools[0].function.parameters"),
    # a schema that compiles but can take no first step: refused, not answered "" with "stop"
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#"}}}}, 400,
     "response_format"),
    # malformed allowed_tools entries
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "required",
                                          "tools": [{"type": "function", "function": "get_weather"}]}},
     400, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"name": ["f"]}]}},
     400, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": "get_weather"}},
     400, "tool_choice"),
    # earlier calls whose arguments nest past the JSON parser's stack are kept as text (too long for the
    # tiny model's context, so refused by the worker; the gateway used to fail on them with a RecursionError)
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[" * 5000}}]}, {"role": "user", "content": "Hi"}]}, 400, "messages"),
]
RAW_CHAT_CASES = [  # bodies json.dumps cannot write
    (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', None),
    (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "top_p": 1e400}', None),
    (b'{"model": "smollm2-135m-instruct", "messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", None),
    (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "preference": '
     + nested(DEEP) + b"}", None),
    (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "tools": '
     + nested(40) + b"}", None),
]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A worker slowed to ~100 steps/s, so a stream stays in flight while the
    hostile requests arrive; max_queue 8."""
    with worker_thread(step_delay=0.01) as (address, worker):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("hostile"), max_queue=8)
        app = create_app(settings)
        with uvicorn_server(app) as url:
            yield url, worker, app


def stream_text(url: str, body: dict) -> tuple[str, str | None]:
    text, finish = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return text, finish


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_hostile_chats_get_4xx_or_answers_and_the_stream_beside_them_is_untouched(target):
    url, _, _ = target
    steady = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 300,
              "temperature": 0, "preference": "short answers"}
    alone = stream_text(url, steady)
    beside: list = []
    ended: list[float] = []
    thread = threading.Thread(target=lambda: (beside.append(stream_text(url, steady)), ended.append(time.monotonic())))
    thread.start()
    answered: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for overrides, status, param in CHAT_CASES:
            response = client.post("/v1/chat/completions", content=raw({**BASE, **overrides}),
                                   headers={"content-type": "application/json"})
            answered.append(time.monotonic())
            assert response.status_code == status, (overrides if len(str(overrides)) < 300 else "...", response.text)
            if status == 200:
                choices = response.json()["choices"]
                assert all(c["finish_reason"] in ("length", "stop") for c in choices)
            else:
                assert_error(response, status, param)
        for body, param in RAW_CHAT_CASES:
            response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert_error(response, 400, param)
    thread.join(120)
    assert beside == [alone] and alone[1] == "length"
    # It ran beside them: still decoding when the first hostile answers came back.
    assert ended[0] > answered[len(answered) // 4], "the steady stream ended before the hostile requests"


def test_hostile_responses_inputs(target):
    url = target[0]
    base = {"model": MODEL, "max_output_tokens": 4}
    with httpx.Client(base_url=url, timeout=120) as client:
        response = client.post("/v1/responses", json={**base, "input": [{"role": ["user"], "content": "Hi"}]})
        assert_error(response, 400, "input[0].role")
        deep = [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[" * 5000},
                {"type": "function_call_output", "call_id": "c", "output": "ok"}]
        response = client.post("/v1/responses", json={**base, "input": deep})
        assert_error(response, 400)  # kept as text: too long for the tiny model's context
        # 20,000 parallel calls in a row are one assistant message, written out once (not once per call)
        calls = [{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"} for i in range(20_000)]
        started = time.perf_counter()
        response = client.post("/v1/responses", json={**base, "input": [*calls, {"role": "user", "content": "Hi"}]})
        assert_error(response, 400, "input")["code"] == "context_length_exceeded"  # from the character count
        assert time.perf_counter() - started < 10
        # the engine's errors name each route's own fields
        response = client.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 600, "max_tokens": 4})
        assert_error(response, 400, "prompt")["code"] == "context_length_exceeded"
        response = client.post("/v1/responses", json={**base, "input": "Hi", "max_output_tokens": 600})
        assert_error(response, 400, "max_output_tokens")
        assert client.post("/v1/responses", json={**base, "input": "Hi"}).status_code == 200


@pytest.fixture(scope="module")
def failing_grammar_target(tmp_path_factory):
    """An engine whose grammar parser gives up at the first mask, as
    llguidance does mid-answer on a schema with no finite instance."""
    from pad_core.testing import tiny_engine

    engine = tiny_engine()
    start = engine.structured.start

    def failing_start(spec):
        matcher = start(spec)
        matcher.write_mask = lambda address, size: False
        return matcher

    engine.structured.start = failing_start
    with worker_thread(engine=engine) as (address, _worker):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("grammar"))
        with uvicorn_server(create_app(settings)) as url:
            yield url


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_the_grammar_engine_cannot_follow_is_a_400_naming_it(failing_grammar_target, stream):
    body = {**BASE, "stream": stream, "response_format": {"type": "json_object"}}
    with httpx.Client(base_url=failing_grammar_target, timeout=60) as client:
        response = client.post("/v1/chat/completions", json=body)
        error = assert_error(response, 400, "response_format")  # failed at the first token: before any byte
        assert error["type"] == "invalid_request_error" and error["message"].startswith("structured output:")
        response = client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 4,
                                                       "stream": stream, "text": {"format": {"type": "json_object"}}})
        assert_error(response, 400, "text.format")  # named as the Responses API names it
        assert client.post("/v1/chat/completions", json=BASE).status_code == 200  # the same connection goes on


def test_bodies_not_sent_as_json_objects_are_named(target):
    url = target[0]
    body = json.dumps(BASE).encode()
    with httpx.Client(base_url=url, timeout=60) as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""):
            response = client.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
            error = assert_error(response, 400)
            assert error["code"] == "invalid_json" and "Content-Type" in error["message"], error
        for sent in (b"[]", b"5", b'"x"', b"null"):
            response = client.put("/v1/users/alice/preferences", content=sent,
                                  headers={"content-type": "application/json"})
            assert_error(response, 400)
        response = client.post("/v1/chat/completions", content=body)  # no Content-Type at all: taken as JSON
        assert response.status_code == 200, response.text


def test_a_misspelt_field_is_named(target):
    response = httpx.post(f"{target[0]}/v1/chat/completions", json={"Messages": 1})
    error = assert_error(response, 400, "Messages")
    assert error["code"] == "unknown_parameter" and "did you mean 'messages'?" in error["message"]


def refusal_of_announced_body(url: str, length: int) -> tuple[int, dict]:
    """Sends only the headers of a request announcing `length` body bytes,
    and reads the answer: the server must refuse from the Content-Length
    alone, without waiting for a byte of the body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        data = b""
        while not whole_response(data) and (chunk := sock.recv(65536)):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def whole_response(data: bytes) -> bool:
    head, separator, body = data.partition(b"\r\n\r\n")
    length = head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0]
    return bool(separator) and len(body) >= int(length or 0)


def test_bodies_over_the_limit_are_refused_before_reading(target):
    url = target[0]
    started = time.perf_counter()
    status, body = refusal_of_announced_body(url, 20 * 2**20)  # announced, never sent
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert time.perf_counter() - started < 2  # answered once the client pauses (DRAIN_IDLE_S)
    # Sent whole, a refused body is read and dropped before the answer (request_body.drain):
    # closing while it still arrives would reset the connection and lose the 413. Past
    # DRAIN_BYTES the refusal and the reset race, as with any server that stops reading.
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (20 * 2**20) + b'"}]}'
    many = b'{"model": "x", "messages": [' + b",".join([b'{"role": "user", "content": "Hi"}'] * 1_000_000) + b"]}"
    assert len(big) < DRAIN_BYTES < len(many)
    for content in (big, big, many):
        started = time.perf_counter()
        try:
            response = httpx.post(f"{url}/v1/chat/completions", content=content,
                                  headers={"content-type": "application/json"})
        except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
            assert content is many  # a drained body always gets its answer
        else:
            assert assert_error(response, 413)["code"] == "request_too_large"
        assert time.perf_counter() - started < 5
    started = time.perf_counter()
    assert httpx.get(f"{url}/health").status_code == 200 and time.perf_counter() - started < 1


def test_store_inputs(target):
    url, _, app = target
    with httpx.Client(base_url=url, timeout=60) as client:
        put = lambda user, body: client.put(f"/v1/users/{user}/preferences", content=body,  # noqa: E731
                                            headers={"content-type": "application/json"})
        assert_error(put("alice", raw({"preferences": [{"text": "x", "weight": 1e308}]})), 400,
                     "preferences[0].weight")
        assert_error(put("alice", b'{"preferences": [{"text": "x", "weight": 1' + b"0" * 400 + b"}]}"), 400,
                     "preferences[0].weight")
        assert_error(put("alice", b'{"preferences": [{"text": "x", "weight": 1' + b"0" * 5000 + b"}]}"), 400)
        assert_error(put("alice", b'{"preferences": ' + nested(DEEP) + b"}"), 400)
        assert_error(put("alice", raw({"preferences": ["\ud800"]})), 400)
        assert_error(client.patch("/v1/users/alice/preferences", json={"add": ["x"], "remove": [[["deep"]]]}), 400)
        feedback = {"completion_id": "chatcmpl-1", "rating": "up"}
        assert_error(client.post("/v1/feedback", json={**feedback, "choice_index": 10**26}), 400, "choice_index")
        assert_error(client.post("/v1/feedback", json={**feedback, "preferred_over": "chatcmpl-2",
                                                       "preferred_over_choice_index": -1}), 400)
        assert_error(client.post("/v1/feedback", content=raw({**feedback, "comment": "\udc00"})), 400)
        assert_error(client.post("/v1/feedback", json={**feedback, "rating": 10**30}), 400, "rating")
        # user ids: bytes that are not UTF-8 are refused, so %FF and %FE never both become "\ufffd"
        assert_error(put("%FF", raw({"preferences": ["x"]})), 400, "user_id")
        assert_error(client.get("/v1/users/%FE/preferences"), 400, "user_id")
        assert put("%EF%BF%BD", raw({"preferences": ["x"]})).status_code == 200  # a real U+FFFD is a user id
        assert client.get("/v1/users/%EF%BF%BD/preferences").json()["user"] == "\ufffd"
        assert put("alice", raw({"preferences": [{"text": "short answers", "weight": 100}]})).status_code == 200


async def test_a_profile_stored_before_these_bounds_is_a_400_not_a_500(target):
    """A weight of 1e308 stored by an older server: alice's chats are refused
    (naming her profile), and nobody else's are hurt."""
    from sqlalchemy import update

    from server.store import schema

    url, _, app = target
    store = app.state.store
    await store.put_preferences("mallory", ["placeholder"])
    async with store._write() as conn:
        await conn.execute(update(schema.user_profiles).where(schema.user_profiles.c.user_id == "mallory")
                           .values(preferences=json.dumps([{"text": "x", "weight": 1e308}])))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        response = await client.post("/v1/chat/completions", json={**BASE, "user": "mallory"})
        assert_error(response, 400, "user")
        assert (await client.post("/v1/chat/completions", json={**BASE, "user": "bob"})).status_code == 200


def test_openapi_states_the_real_statuses_and_media_types(target):
    document = httpx.get(f"{target[0]}/openapi.json").json()
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert not [op for op in operations if "422" in op["responses"]]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "Retry-After" in chat["429"]["headers"] and "Retry-After" in chat["503"]["headers"]
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert document["paths"]["/v1/users/{user_id}/preferences"]["put"]["requestBody"]["required"]


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        (json.dumps({"a": "\ud83d\ude00"}).encode(), False),  # a surrogate pair is an emoji
        (json.dumps({"a": "\\ud800"}).encode(), False),  # a backslash, then text
        (json.dumps({"a": "x\ud800"}).encode(), True),
        (json.dumps({"a": "\\\udc00"}).encode(), True),
        (json.dumps({"\ud800": 1}).encode(), True),
        (nested(32), False),
        (nested(33), True),
        (nested(DEEP), True),
        (json.dumps({"a": "[" * 100}).encode(), False),  # brackets in a string are text
        (json.dumps({f"k{i}": 0 for i in range(1001)}).encode(), True),
        (b'{"a": NaN}', True),
        (b'{"a": -Infinity}', True),
        (b'{"a": 1e400}', True),
        (b'{"a": 1' + b"0" * 5000 + b"}", True),
        (b'{"a": "\xff"}', True),
        ("{}".encode("utf-16"), True),
    ],
)
def test_parse_json_refuses_what_later_layers_cannot_take(body, refused):
    from server.errors import APIError
    from server.request_body import parse_json

    if not refused:
        parse_json(body)
        return
    with pytest.raises(APIError) as info:
        parse_json(body)
    assert info.value.status == 400
