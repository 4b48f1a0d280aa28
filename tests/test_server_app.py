"""Gateway behaviour that needs no worker: 503 while the worker is not
ready, request validation, and the OpenAI error shape (in-process app)."""

from __future__ import annotations

import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings

BODY = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def app(tmp_path):
    return create_app(ServerSettings(data_dir=tmp_path), start_worker=False)


async def post(app, body, path="/v1/chat/completions", headers=None):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post(path, json=body, headers=headers)


async def test_health_and_chat_are_503_until_the_worker_is_ready(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        response = await client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "worker_unavailable"
    assert response.headers["retry-after"] == "5" and health.headers["retry-after"] == "5"


async def test_version_is_the_installed_packages_and_needs_no_key(tmp_path):
    import importlib.metadata

    app = create_app(ServerSettings(data_dir=tmp_path, api_keys=["k"]), start_worker=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        answer = await client.get("/version")
    assert answer.status_code == 200 and answer.json() == {"version": importlib.metadata.version("pad-server")}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**BODY, "messages": [{"role": "tool", "tool_call_id": "1"}]}, "messages[0].content"),
        ({**BODY, "messages": [{"role": "assistant", "content": None, "tool_calls": []}]}, "messages[0].content"),
        ({**BODY, "messages": [{"role": "user", "content": "x", "cache_control": {}}]}, "messages[0].cache_control"),
        ({**BODY, "response_format": {"type": "grammar", "grammar": "x"}}, "response_format"),
        ({**BODY, "logit_bias": {"x": 5}}, "logit_bias"),
        ({**BODY, "logit_bias": {"1": 101}}, "logit_bias[1]"),
        ({**BODY, "n": 0}, "n"),
        ({**BODY, "top_logprobs": 2}, "top_logprobs"),
        ({**BODY, "preference": [{"text": ""}]}, "preference[0].text"),
        ({**BODY, "preference": ["x"] * 9}, "preference"),
        ({**BODY, "preference": "x" * 5000}, "preference"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "stream_options": {"include_usage": True}}, "stream_options"),
        ({**BODY, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0]"),
        ({**BODY, "tool_choice": "required"}, "tool_choice"),
        ({**BODY, "tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "allowed_tools", "mode": "sometimes", "tools": []}}, "tool_choice"),
        ({**BODY, "functions": [{"name": "f"}], "function_call": {"name": 3}}, "function_call"),
        ({**BODY, "audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({**BODY, "top_k": -2}, "top_k"),
        ({**BODY, "repetition_penalty": 0}, "repetition_penalty"),
        ({**BODY, "store": 1}, "store"),
        # a tagged union's tag is not a field: the client's own path (regression: json_schema.json_schema)
        ({**BODY, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": True}}},
         "response_format.json_schema.schema"),
        ({**BODY, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({**BODY, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}, "x": 1}}, "response_format.x"),
        ({**BODY, "tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]},
         "tools[0].function.parameters"),
        ({**BODY, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ],
)
async def test_invalid_requests_are_400_naming_the_parameter(app, body, param):
    response = await post(app, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_malformed_json_is_an_openai_shaped_400(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_api_key_required_when_configured(tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path, api_keys=["k1"]), start_worker=False)
    assert (await post(app, BODY)).status_code == 401
    assert (await post(app, BODY, headers={"Authorization": "Bearer k2"})).status_code == 401
    assert (await post(app, BODY, headers={"Authorization": "Bearer k1"})).status_code == 503  # past auth


async def test_every_refused_generation_request_is_counted_once(tmp_path):
    """pad_requests_total counts a generation request refused before its
    route ran (a wrong key, an unknown parameter, a body of the wrong type,
    bad JSON) as well as one the route refuses, each once; other paths are
    not generation requests. A body over the limit (413, refused before
    routing) counts too."""
    import re

    app = create_app(ServerSettings(data_dir=tmp_path, api_keys=["sk-a"], max_request_bytes=1024), start_worker=False)
    key = {"Authorization": "Bearer sk-a"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        sent = [
            await client.post("/v1/chat/completions", json=BODY),  # 401: no key
            await client.post("/v1/chat/completions", json={**BODY, "nope": 1}, headers=key),  # 400 unknown
            await client.post("/v1/completions", json={"model": "m", "prompt": 5}, headers=key),  # 400 type
            await client.post("/v1/responses", content=b"{not json", headers={**key, "content-type": "application/json"}),
            await client.post("/v1/chat/completions", json={**BODY, "n": 0}, headers=key),  # 400 in the route
            await client.post("/v1/chat/completions", json=BODY, headers=key),  # 503: no worker
            await client.post("/v1/users/u/preferences", json={}, headers=key),  # not a generation request
            await client.post("/v1/completions", content=b"x" * 4000, headers=key),  # 413, from the body limit
            await client.post("/v1/users/u/preferences", content=b"x" * 4000, headers=key),  # 413, not counted
        ]
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in sent[:6]] == [401, 400, 400, 400, 400, 503]
    counted = {status: float(value) for status, value in re.findall(r'^pad_requests_total\{status="(\d+)"\} (\S+)$',
                                                                   metrics, re.MULTILINE)}
    assert [r.status_code for r in sent[7:]] == [413, 413]
    assert counted == {"401": 1.0, "400": 4.0, "503": 1.0, "413": 1.0}


@pytest.mark.parametrize("choice", [
    {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function",
                                                                               "function": {"name": "b"}}]}},  # Chat
    {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "b"}]},  # Responses
])
def test_allowed_tools_in_both_apis_shapes_narrow_the_tools(choice):
    """The SDK's ChatCompletionAllowedToolChoiceParam nests mode and tools
    under "allowed_tools" (regression: it was a 400); Responses puts them
    beside "type"."""
    from pad_core.types import ToolFunction
    from server.openai_models import tool_output

    tools = [ToolFunction("a", None, None), ToolFunction("b", None, None)]
    spec = tool_output(tools, choice, None)
    assert [t.name for t in spec.tools] == ["b"] and not spec.auto
    auto = tool_output(tools, {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "a"}}]}}, None)
    assert [t.name for t in auto.tools] == ["a"] and auto.auto


async def test_a_405_lists_the_methods_of_its_path(app):
    """RFC 9110: a 405 names what the path allows (regression: FastAPI's
    included routers hid their routes' methods, and Allow was empty)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        chat = await client.put("/v1/chat/completions")
        models = await client.post("/v1/models")
    assert chat.status_code == 405 and chat.headers["allow"] == "GET, POST"  # the stored completions' list, creation
    assert models.status_code == 405 and models.headers["allow"] == "GET"
    assert chat.json()["error"]["type"] == "invalid_request_error"


async def test_a_too_long_stop_list_says_so(app):
    """Of a union's members, the one that took the value's type names the
    fault (regression: 17 stop strings were "not a valid string")."""
    error = (await post(app, {**BODY, "stop": ["s"] * 17})).json()["error"]
    assert error["param"] == "stop" and "at most 16" in error["message"]


@pytest.mark.parametrize(("body", "code"), [
    ({**BODY, "temperature": "hot"}, "invalid_type"),
    ({**BODY, "n": 0}, "invalid_value"),
    ({"model": BODY["model"]}, "missing_required_parameter"),  # (model may be left out, as in vLLM)
])
async def test_validation_errors_carry_openais_codes(app, body, code):
    assert (await post(app, body)).json()["error"]["code"] == code
