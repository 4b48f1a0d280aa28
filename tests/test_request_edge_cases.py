"""Edge cases of the request fields a review found mishandled, over real
HTTP in front of the worker on the tiny engine: preference values that
mean "off", weight-0 preferences, the `pad` echo's settings (also before a
queued background response starts), PAD settings out of range named by
code and bounded in the OpenAPI document, a lone preference object, and a
body field called `path` named as the param."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import tiny_gateway


MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "How do I sleep better?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_gateway(tmp_path_factory.mktemp("edges")) as url:
        yield url


def chat(server, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 6, "temperature": 0, **extra}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_blank_and_empty_preferences_mean_off(server):
    for value in ("", "   \n", [], None):
        pad = chat(server, preference=value).json()["pad"]
        assert pad["preferences"] == [] and pad["applied"] is False, value


def test_weight_zero_preferences_decode_plainly(server):
    plain = chat(server, preference=None).json()
    for extra in ({"preference": [{"text": "short answers", "weight": 0}]},
                  {"preference": "short answers", "pad": {"weight": 0}}):
        answer = chat(server, **extra).json()
        assert answer["pad"]["applied"] is False, extra
        assert answer["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"], extra
    steered = chat(server, preference=[{"text": "short answers", "weight": 0}, {"text": "humour", "weight": 1}])
    pad = steered.json()["pad"]
    assert "applied" not in pad and [p["weight"] for p in pad["preferences"]] == [0, 1]


def test_pad_weight_zero_with_the_preference_in_the_prompt_is_still_applied(server):
    """Prompting alone (no reward guidance) steers the answer: not "applied": false."""
    prompted = chat(server, preference="short answers", pad={"weight": 0, "base_sees_preference": True}).json()
    assert prompted["pad"]["base_sees_preference"] is True and "applied" not in prompted["pad"]
    plain = chat(server, preference=None).json()
    assert prompted["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the preference is in the prompt
    dropped = chat(server, preference=[{"text": "short answers", "weight": 0}], pad={"base_sees_preference": True})
    assert dropped.json()["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]  # weight 0: left out entirely
    assert dropped.json()["pad"]["applied"] is False


def test_the_pad_echo_says_whether_the_base_sees_the_preference(server):
    pad = chat(server, preference="short answers", pad={"top_k": 12}).json()["pad"]
    assert pad == {"preferences": [{"text": "short answers", "weight": 1.0}], "source": "request",
                   "reward_model": "self", "weight": 4.0, "top_k": 12, "min_p": 0.1, "base_sees_preference": False}


def test_a_queued_background_response_echoes_its_settings_before_it_starts(server):
    created = httpx.post(f"{server}/v1/responses", json={
        "model": MODEL, "input": "How do I sleep better?", "max_output_tokens": 4, "background": True,
        "store": True, "preference": "short answers", "pad": {"min_p": 0.2}}, timeout=60)
    assert created.status_code == 200, created.text
    pad = created.json()["pad"]
    assert pad["weight"] == 4.0 and pad["top_k"] == 80 and pad["min_p"] == 0.2 and pad["reward_model"] == "self"


def test_pad_settings_out_of_range_are_named_and_bounded_in_openapi(server):
    error = error_of(chat(server, preference="x", pad={"top_k": 101}))
    assert error["param"] == "pad.top_k" and error["code"] == "invalid_value"
    error = error_of(chat(server, preference="x", pad={"top_k": "many"}))
    assert error["param"] == "pad.top_k" and error["code"] in ("invalid_type", "invalid_value")
    schema = httpx.get(f"{server}/openapi.json", timeout=30).json()
    options = schema["components"]["schemas"]["PadOptions"]["properties"]["top_k"]
    bounds = options.get("anyOf", [options])
    assert any(b.get("maximum") == 100 for b in bounds), options
    rating = schema["components"]["schemas"]["FeedbackRequest"]["properties"]["rating"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 5} in rating and not any(r["type"] == "number" for r in rating)


def test_a_single_preference_object_is_told_to_be_a_list(server):
    error = error_of(chat(server, preference={"text": "short answers", "weight": 1}))
    assert error["param"] == "preference" and "list" in error["message"]


def test_a_body_field_called_path_is_the_param(server):
    response = httpx.post(f"{server}/v1/reward_models", json={"name": "persrm"}, timeout=30)
    assert error_of(response)["param"] == "path"


def test_a_queued_background_response_echoes_the_workers_defaults(tmp_path):
    """A worker started with its own PAD defaults: the echo of a response
    not yet run gives what the worker will use, not the gateway's defaults."""
    from server_helpers import uvicorn_server, worker_thread

    from pad_core.settings import EngineSettings
    from pad_core.testing import tiny_engine
    from server.app import create_app
    from server.settings import ServerSettings

    engine = tiny_engine(EngineSettings(default_weight=2.5, default_top_k=7))
    with worker_thread(engine=engine) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        created = httpx.post(f"{url}/v1/responses", json={
            "model": MODEL, "input": "Hi", "max_output_tokens": 2, "background": True, "store": True,
            "preference": "short answers"}, timeout=60)
        assert created.status_code == 200, created.text
        pad = created.json()["pad"]
        assert (pad["weight"], pad["top_k"], pad["base_sees_preference"]) == (2.5, 7, False)


def test_an_object_with_too_many_keys_is_named(server):
    """logit_bias over the JSON parser's key limit: a 400 naming logit_bias
    (it said the body was not valid JSON); over OpenAI's 300 but under that
    limit, the field's own rule."""
    error = error_of(chat(server, logit_bias={str(i): 1 for i in range(1500)}))
    assert (error["param"], error["code"]) == ("logit_bias", "too_many_keys") and "1500 keys" in error["message"]
    error = error_of(chat(server, messages=[{"role": "user", "content": "Hi", **{f"x{i}": 1 for i in range(1200)}}]))
    assert error["param"] == "messages[0]" and error["code"] == "too_many_keys"
    assert error_of(chat(server, logit_bias={str(i): 1 for i in range(400)}))["param"] == "logit_bias"
