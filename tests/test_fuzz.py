"""A bounded schemathesis run over the real gateway (uvicorn, real HTTP) in
front of the real worker loop on the tiny engine. Every generated request,
valid or not, must get a status the OpenAPI document states, with a body and
media type that match it: no 5xx, and every error OpenAI-shaped.

Most chat requests the fuzzer invents name an unknown model (404); a share
of them is pointed at the served model with a small max_tokens, so they
reach the engine and decode. Bounded: a few hundred requests, well under a
minute on two cores."""

from __future__ import annotations

import itertools

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
MAX_EXAMPLES = 20  # per operation (each one the OpenAPI document lists)
# Schema-valid fields that hide the engine (a refused value, a grammar to compile, a stored response to find)
HIDING = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format", "audio",
          "modalities", "web_search_options", "moderation", "text", "previous_response_id", "conversation",
          "prompt", "background", "logit_bias", "suffix", "best_of", "echo", "stream_options", "output_config")
_STEER = itertools.count()


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    with worker_thread() as (address, worker):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("fuzz"), max_queue=32)
        with uvicorn_server(create_app(settings)) as url:
            yield url, worker


def openapi_document() -> dict:
    """The document /openapi.json serves (it depends on no running state).
    Loaded at import: schemathesis's fixture-based loader does not support
    this pytest."""
    import tempfile

    with tempfile.TemporaryDirectory() as data_dir:
        return create_app(ServerSettings(data_dir=data_dir), start_worker=False).openapi()


schema = schemathesis.openapi.from_dict(openapi_document())


GENERATION_PATHS = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
                    "/v1/completions": ("max_tokens",), "/v1/responses": ("max_output_tokens",),
                    "/v1/messages": ("max_tokens",)}


def steer_to_the_engine(case) -> None:
    """Gives every schema-valid generation body few tokens (the tiny model's
    512-token context would otherwise be decoded whole), and points every
    other one (chat, completions, responses, messages) at the served model,
    without the fields that would refuse it or compile a grammar."""
    body = case.body
    if case.operation.path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    if case.meta is not None and case.meta.generation.mode != GenerationMode.POSITIVE:
        return  # schema-invalid on purpose: left as generated, the server must refuse it
    # Every schema-valid generation is short: a max_tokens up to 2**63 (or none) would decode the tiny
    # model's whole context, n times (the bounds themselves are hostile_inputs' to check).
    limits = GENERATION_PATHS[case.operation.path]
    for name in limits:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 4:
            body[name] = 4
    if not any(name in body for name in limits):
        body[limits[0]] = 4
    if next(_STEER) % 2:
        return
    body["model"] = MODEL
    for name in HIDING:  # schema-valid (the route refuses or compiles them), but they hide the engine
        body.pop(name, None)
    for message in body.get("messages") if isinstance(body.get("messages"), list) else ():
        if isinstance(message, dict) and message.get("role") in ("tool", "function"):
            message["role"] = "user"
        if isinstance(message, dict) and message.get("content") is None:
            message["content"] = "Hi"


def assert_error_shaped(response, path: str) -> None:
    if response.status_code < 400:
        return
    header = lambda name: (response.headers.get(name) or [""])[0]  # noqa: E731 - schemathesis: name -> [values]
    assert header("content-type").startswith("application/json"), response.headers
    if path.startswith("/v1/messages"):  # the Anthropic routes: Anthropic's shape
        body = response.json()
        assert set(body) == {"type", "error"} and body["type"] == "error"
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["message"] and isinstance(error["type"], str)
    if response.status_code in (429, 503):
        assert header("retry-after").isdigit()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_documented_answers_and_no_5xx(case, fuzz_target):
    steer_to_the_engine(case)
    # Every default check (no 5xx, documented status, media type, headers,
    # response schema, schema-invalid data refused, ...), but not "every
    # schema-valid request succeeds": a valid shape may still name a model,
    # a user or an adapter folder that does not exist.
    response = case.call_and_validate(base_url=fuzz_target[0], timeout=60,
                                      excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500, response.text
    assert_error_shaped(response, case.operation.path)


def test_the_fuzzed_worker_still_serves(fuzz_target):
    """After the run: the fuzzer did reach the engine, nothing is left
    running, and a normal request answers."""
    url, worker = fuzz_target
    metrics = httpx.get(f"{url}/metrics").text
    assert 'pad_requests_total{status="200"}' in metrics
    assert not [line for line in metrics.splitlines() if line.startswith('pad_requests_total{status="5')]
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert worker.engine.stats()["running_requests"] == 0

