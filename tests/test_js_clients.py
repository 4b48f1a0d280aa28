"""JavaScript clients the team did not write, against the gateway and the
worker loop on the tiny engine: the official `openai` npm SDK (baseURL
swapped, PAD's fields as extra body params) and the Vercel AI SDK (`ai` +
`@ai-sdk/openai`: `openai.chat(model)` on Chat Completions, `openai(model)`
on the Responses API). The scripts are tests/js/*.mjs; each runs every case
against the live server and prints {case: result | {error}} as JSON, which
the tests here assert on. The versions are pinned by tests/js/package-lock.json;
`npm ci` installs them once (skipped, saying why, without node / npm or
without the npm registry).

The Responses API's item references (which the AI SDK sends for every
earlier answer unless its `store` option is false) are also checked over
plain HTTP, so they are covered where node is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
QUESTION = "How do I sleep better?"
PREFERENCE = "I like short answers with a bit of humour"
JS = Path(__file__).parent / "js"
ADMIN, ALICE, BOB = "admin-key", "alice-key", "bob-key"
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH",
                  "network", "getaddrinfo", "self-signed certificate", "UNABLE_TO_GET_ISSUER_CERT")
MIN_NODE = 20


# ---- node, the packages, the server -----------------------------------------
def installed_matches_lock() -> bool:
    """node_modules holds what package-lock.json pins (npm's own record of
    what it installed, node_modules/.package-lock.json, agrees)."""
    installed = JS / "node_modules" / ".package-lock.json"
    if not installed.exists():
        return False
    wanted = json.loads((JS / "package-lock.json").read_text())["packages"]
    have = json.loads(installed.read_text())["packages"]
    return all(have.get(path, {}).get("version") == entry.get("version")
               for path, entry in wanted.items() if path and not entry.get("optional"))


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with tests/js's packages installed (npm ci, once)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the JavaScript client tests (Node 20 or newer)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE:
        pytest.skip(f"node {version} is too old: the pinned SDKs need Node {MIN_NODE} or newer")
    if not installed_matches_lock():
        run = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS,
                             capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            output = run.stdout + run.stderr
            offline = next((line for line in output.splitlines() if any(sign in line for sign in NETWORK_ERRORS)), None)
            if offline is not None:
                pytest.skip(f"npm ci could not reach the npm registry ({offline.strip()[:200]})")
            pytest.fail(f"npm ci failed in {JS}:\n{output[-3000:]}")
    return node


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The gateway with three keys: an unbound one (the scripts') and two bound to a user each."""
    with worker_thread() as (address, _worker):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("js-clients"),
                                  api_keys=[ADMIN, f"{ALICE}:alice", f"{BOB}:bob"])
        with uvicorn_server(create_app(settings)) as url:
            yield url


def run_script(node: str, server: str, script: str) -> dict:
    run = subprocess.run([node, script, f"{server}/v1"], cwd=JS, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PAD_API_KEY": ADMIN, "AI_SDK_LOG_WARNINGS": "false"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def openai_js(node, server) -> dict:
    return run_script(node, server, "openai_sdk.mjs")


@pytest.fixture(scope="module")
def ai_sdk(node, server) -> dict:
    return run_script(node, server, "ai_sdk.mjs")


def case(results: dict, name: str) -> dict:
    """One case's result; its recorded error fails the test, saying what the SDK raised."""
    result = results[name]
    assert "error" not in result, f"{name}: {json.dumps(result['error'], indent=1)}"
    return result


def assert_pad(pad: dict, weight: float = 2.0) -> None:
    assert pad["source"] == "request" and pad["preferences"] == [{"text": PREFERENCE, "weight": 1.0}]
    assert pad["weight"] == weight and "applied" not in pad  # the preference steered the answer


def assert_verdict(value: dict) -> None:
    assert set(value) == {"ok", "color"} and isinstance(value["ok"], bool) and value["color"] in ("red", "blue")


def assert_weather_call(name: str, arguments: dict) -> None:
    assert name == "get_weather" and arguments in ({"city": "Paris"}, {"city": "Rome"})


# ---- the openai npm SDK: chat completions ------------------------------------
def test_openai_js_chat_create_with_pad_fields_and_n(openai_js):
    answer = case(openai_js, "chat_create")
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["content"] and c["role"] == "assistant" and c["finish_reason"] == "length" for c in answer["choices"])
    usage = answer["usage"]
    assert usage["completion_tokens"] == 10 and usage["total_tokens"] == usage["prompt_tokens"] + 10
    assert_pad(answer["pad"])
    assert answer["pad"]["top_k"] == 40  # the request's `pad` reached the engine


def test_openai_js_chat_stream_with_usage_and_pad(openai_js):
    streamed, whole = case(openai_js, "chat_stream"), case(openai_js, "chat_create")
    assert streamed["content"] == {str(c["index"]): c["content"] for c in whole["choices"]}  # same seed
    assert streamed["finish"] == {"0": "length", "1": "length"}
    assert streamed["pad"]["chunk"] == 1 and streamed["pad"]["top_k"] == 40  # on the first chunk
    assert_pad({k: v for k, v in streamed["pad"].items() if k != "chunk"})
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens: the second of the two hits
    assert streamed["usage_chunks"] == 1 and streamed["ids"] == 1
    assert [streamed["usage"][key] for key in counts] == [whole["usage"][key] for key in counts]


def test_openai_js_structured_outputs(openai_js):
    answer = case(openai_js, "chat_json_schema")
    assert answer["finish_reason"] == "stop" and json.loads(answer["content"]) == answer["parsed"]
    assert_verdict(answer["parsed"])
    parsed = case(openai_js, "chat_parse_zod")  # chat.completions.parse + zodResponseFormat
    assert parsed["finish_reason"] == "stop"
    assert_verdict(parsed["parsed"])


def test_openai_js_forced_tool_calls(openai_js):
    answer = case(openai_js, "chat_forced_tool")
    assert answer["finish_reason"] == "tool_calls" and answer["content"] is None
    (call,) = answer["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert_weather_call(call["name"], call["arguments"])
    streamed = case(openai_js, "chat_forced_tool_stream")
    assert streamed["finish_reason"] == "tool_calls"
    (call,) = streamed["tool_calls"]
    assert call["id"].startswith("call_")
    assert_weather_call(call["name"], call["arguments"])


def test_openai_js_stream_helpers_and_run_tools(openai_js):
    helper = case(openai_js, "chat_stream_helper")
    assert helper["deltas"] and helper["deltas"] == helper["content"] and helper["finish_reason"] == "length"
    assert helper["usage"]["completion_tokens"] == 6
    tool = case(openai_js, "chat_stream_helper_tool")
    assert tool["finish_reason"] == "tool_calls" and tool["done"] == [{"name": "get_weather",
                                                                       "parsed": tool["parsed_arguments"]}]
    assert_weather_call(tool["name"], tool["parsed_arguments"])
    ran = case(openai_js, "chat_run_tools")
    (arguments,) = ran["called"]
    assert_weather_call("get_weather", arguments)
    assert ran["roles"] == ["assistant", "tool"] and ran["final_function_output"] == f"sunny in {arguments['city']}"


def test_openai_js_tool_choice_auto(openai_js):
    auto = case(openai_js, "chat_tool_choice_auto")  # the tiny model's greedy first token is not "["
    assert auto["finish_reason"] == "length" and auto["content"] and auto["tool_calls"] is None


# ---- the openai npm SDK: responses, completions, models ----------------------
def test_openai_js_responses_create(openai_js):
    response = case(openai_js, "responses_create")
    assert response["object"] == "response" and response["output_types"] == ["message"]
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output_text"]  # the SDK's own convenience property, from our output items
    usage = response["usage"]
    assert usage["output_tokens"] == 6 and usage["total_tokens"] == usage["input_tokens"] + 6
    assert_pad(response["pad"])


def test_openai_js_responses_stream(openai_js):
    streamed = case(openai_js, "responses_stream")
    types = streamed["types"]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert types.count("response.output_text.delta") >= 1 and streamed["sequence"] == list(range(len(types)))
    assert streamed["deltas"] and streamed["deltas"] == streamed["terminal_text"]
    assert streamed["terminal_status"] == "incomplete" and streamed["usage"]["output_tokens"] == 6
    assert_pad(streamed["created_pad"], weight=4.0)  # the server's default weight: the request set none


def test_openai_js_responses_helpers_and_tools(openai_js):
    helper = case(openai_js, "responses_stream_helper")  # responses.stream + text.format json_schema
    assert helper["status"] == "completed" and helper["deltas"] == helper["output_text"]
    assert_verdict(helper["parsed"])
    parsed = case(openai_js, "responses_parse_zod")  # responses.parse + zodTextFormat
    assert parsed["status"] == "completed"
    assert_verdict(parsed["output_parsed"])
    (call,) = case(openai_js, "responses_forced_tool")["calls"]
    assert call["call_id"].startswith("call_")
    assert_weather_call(call["name"], call["arguments"])
    streamed = case(openai_js, "responses_stream_tool")
    assert {"response.function_call_arguments.delta", "response.function_call_arguments.done"} <= set(streamed["types"])
    assert streamed["status"] == "completed"
    assert_weather_call(streamed["name"], streamed["arguments"])


def test_openai_js_responses_second_turn_with_the_first_output(openai_js):
    turns = case(openai_js, "responses_multi_turn")
    assert turns["first"] and turns["second"] and turns["status"] == "incomplete"
    first, second = turns["input_tokens"]
    assert second > first  # the earlier answer (its output items sent back) is in the prompt
    # chained onto the kept first response: the same prompt, the same greedy answer
    assert turns["chained_previous"] == turns["first_id"] and turns["retrieved_same"]
    assert (turns["chained_input_tokens"], turns["chained"]) == (second, turns["second"])
    assert turns["input_items"] == [["message", "user", "Shorter?"]]


def test_openai_js_completions(openai_js):
    answer = case(openai_js, "completions_create")
    assert answer["object"] == "text_completion" and [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["text"] and c["finish_reason"] == "length" for c in answer["choices"])
    assert answer["usage"]["completion_tokens"] == 8
    assert answer["pad"]["source"] == "request" and answer["pad"]["preferences"][0]["text"] == PREFERENCE
    streamed = case(openai_js, "completions_stream")
    assert streamed["text"] and streamed["finish_reason"] == "length" and streamed["usage"]["completion_tokens"] == 4


def test_openai_js_models(openai_js):
    models = case(openai_js, "models")
    assert models["listed"] == [{"id": MODEL, "object": "model", "owned_by": "pad-server"}]
    assert models["retrieved"]["id"] == MODEL and "self" in models["retrieved"]["reward_models"]


def test_openai_js_errors_are_the_sdks_classes(openai_js):
    errors = case(openai_js, "errors")
    expected = {
        "unknown_parameter": ("BadRequestError", 400, "unknown_parameter", "bogus"),
        "stream_bad_request": ("BadRequestError", 400, "invalid_value", "n"),  # refused before the stream starts
        "model_not_found": ("NotFoundError", 404, "model_not_found", "model"),
        "retrieve_not_found": ("NotFoundError", 404, "model_not_found", "model"),
        "responses_previous_id": ("BadRequestError", 400, "previous_response_not_found", "previous_response_id"),
    }
    for name, (cls, status, code, param) in expected.items():
        error = errors[name]
        assert (error["class"], error["status"], error["code"], error["param"]) == (cls, status, code, param), name
        assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{status} "), name
    assert "Unrecognized request argument supplied: bogus" in errors["unknown_parameter"]["message"]


# ---- the Vercel AI SDK -------------------------------------------------------
def test_ai_sdk_chat_generate_and_stream_text(ai_sdk):
    whole, streamed = case(ai_sdk, "chat_generate_text"), case(ai_sdk, "chat_stream_text")
    assert whole["sent"]["url"].endswith("/v1/chat/completions")
    assert {"preference", "pad", "max_tokens", "temperature"} <= set(whole["sent"]["keys"])  # through fetch
    assert whole["text"] and whole["finishReason"] == "length"
    assert whole["usage"]["outputTokens"] == 6
    assert whole["usage"]["totalTokens"] == whole["usage"]["inputTokens"] + 6
    assert_pad(whole["pad"])
    assert {"stream", "stream_options"} <= set(streamed["sent"]["keys"])
    assert streamed["text"] == whole["text"] and streamed["finishReason"] == "length"  # temperature 0
    assert {"text-delta", "finish"} <= set(streamed["parts"]) and streamed["usage"]["outputTokens"] == 6
    assert_pad(streamed["pad"])


def test_ai_sdk_responses_generate_and_stream_text(ai_sdk):
    whole, streamed = case(ai_sdk, "responses_generate_text"), case(ai_sdk, "responses_stream_text")
    assert whole["sent"]["url"].endswith("/v1/responses") and streamed["sent"]["url"].endswith("/v1/responses")
    assert {"preference", "pad", "max_output_tokens", "input"} <= set(whole["sent"]["keys"])
    assert whole["text"] and whole["finishReason"] == "length" and whole["usage"]["outputTokens"] == 6
    assert_pad(whole["pad"])
    assert streamed["text"] == whole["text"] and streamed["finishReason"] == "length"
    assert {"text-delta", "finish"} <= set(streamed["parts"]) and streamed["usage"] == whole["usage"]
    assert_pad(streamed["pad"])  # from response.created


def test_ai_sdk_legacy_completions(ai_sdk):
    streamed = case(ai_sdk, "completion_stream_text")
    assert streamed["sent"]["url"].endswith("/v1/completions") and "preference" in streamed["sent"]["keys"]
    assert streamed["text"] and streamed["finishReason"] == "length" and streamed["usage"]["outputTokens"] == 6


def test_ai_sdk_structured_outputs(ai_sdk):
    for name, key in (("chat_generate_object", "object"), ("responses_generate_object", "object"),
                      ("responses_output_object", "output"), ("stream_object", "object")):
        result = case(ai_sdk, name)
        assert_verdict(result[key])
    assert "response_format" in case(ai_sdk, "chat_generate_object")["sent"]["keys"]
    assert "text" in case(ai_sdk, "responses_generate_object")["sent"]["keys"]  # text.format
    assert case(ai_sdk, "stream_object")["partials"] >= 2  # streamed, not one piece


def test_ai_sdk_forced_tool_calls(ai_sdk):
    chat = case(ai_sdk, "chat_forced_tool")
    assert chat["finishReason"] == "tool-calls"
    (call,) = chat["toolCalls"]
    assert_weather_call(call["toolName"], call["input"])
    assert chat["called"] == [call["input"]["city"]] and chat["toolResults"] == [f"sunny in {call['input']['city']}"]
    for name in ("chat_stream_tool", "responses_stream_tool"):
        streamed = case(ai_sdk, name)
        assert streamed["finishReason"] == "tool-calls", name
        assert {"tool-input-delta", "tool-call", "tool-result"} <= set(streamed["parts"]), name
        (call,) = streamed["toolCalls"]
        assert_weather_call(call["toolName"], call["input"])


def test_ai_sdk_responses_tool_round_trip(ai_sdk):
    """The call and its result go back as function_call / function_call_output items."""
    first, second = case(ai_sdk, "responses_tool_round_trip")["steps"]
    assert first["finishReason"] == "tool-calls"
    (call,) = first["toolCalls"]
    assert_weather_call(call["toolName"], call["input"])
    assert first["toolResults"] == [f"sunny in {call['input']['city']}"]
    assert second["finishReason"] == "length" and second["text"] and not second["toolCalls"]


def test_ai_sdk_default_tool_choice(ai_sdk):
    """The SDK's default toolChoice with tools is "auto" (a 400 before this
    server honoured it): the model may answer text, as the tiny one does."""
    answers = case(ai_sdk, "default_tool_choice")
    for api in ("chat", "responses"):
        answer = answers[api]
        assert answer["sent"] in ("auto", None), answer  # None: left to the API's default, also "auto"
        assert answer["finishReason"] == "length" and answer["text"] and answer["toolCalls"] == 0, answer


def test_ai_sdk_responses_second_turn_by_item_reference(ai_sdk):
    """Regression: the AI SDK sends an earlier answer as an item_reference
    (store defaults to true), which was a 400; it resolves to the answer the
    feedback memory keeps, so the turn answers as if the message were sent."""
    turns = case(ai_sdk, "responses_multi_turn")
    assert turns["referenced_types"] == ["user", "item_reference", "user"]
    assert turns["inline_types"] == ["user", "assistant", "user"]
    assert turns["first"] and turns["referenced"] and turns["referenced"] == turns["inline"]


def test_ai_sdk_responses_in_a_conversation(ai_sdk):
    """providerOptions.openai.conversation: the SDK sends each turn's new
    message only; the server reads the conversation before it and adds the
    turn after, so the second turn answers as the whole conversation does."""
    turns = case(ai_sdk, "responses_conversation")
    assert turns["second_input"] == ["user"]
    assert turns["first"] and turns["second"] and turns["second"] == turns["inline"]
    assert turns["items"] == [["user", QUESTION], ["assistant", turns["first"]], ["user", "Shorter?"],
                              ["assistant", turns["second"]]]


def test_ai_sdk_errors(ai_sdk):
    errors = case(ai_sdk, "errors")
    for name, status, code in (("chat_model_not_found", 404, "model_not_found"),
                               ("responses_model_not_found", 404, "model_not_found")):
        error = errors[name]
        assert error["class"] == "APICallError" and error["status"] == status and not error["retryable"], name
        assert error["body"]["error"]["code"] == code and error["message"] == error["body"]["error"]["message"], name


# ---- item references over plain HTTP (no node needed) ------------------------
def respond(server: str, key: str, input_, **fields) -> httpx.Response:
    body = {"model": MODEL, "input": input_, "max_output_tokens": 4, "temperature": 0, **fields}
    return httpx.post(f"{server}/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def streamed_response(server: str, key: str, input_) -> dict:
    """A streamed response, read up to its terminal event and no further (the
    connection is closed at once, as a client acting on that event may)."""
    body = {"model": MODEL, "input": input_, "max_output_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] in ("response.completed",
                                                                               "response.incomplete"):
                return json.loads(line[6:])["response"]
    raise AssertionError("no terminal event")


def second_turn(reference: dict) -> list[dict]:
    return [{"role": "user", "content": QUESTION}, reference, {"role": "user", "content": "Shorter?"}]


def test_an_item_reference_is_the_answer_it_names(server):
    first = respond(server, ADMIN, QUESTION).json()
    (message,) = first["output"]
    assert message["id"] == "msg_" + first["id"].removeprefix("resp_")  # named after its response
    inline = respond(server, ADMIN, second_turn({"role": "assistant", "content": message["content"][0]["text"]}))
    referenced = respond(server, ADMIN, second_turn({"type": "item_reference", "id": message["id"]}))
    untyped = respond(server, ADMIN, second_turn({"id": message["id"]}))  # OpenAI's type is optional
    assert inline.status_code == referenced.status_code == untyped.status_code == 200, referenced.text
    texts = [r.json()["output"][0]["content"][0]["text"] for r in (inline, referenced, untyped)]
    assert texts[0] and texts[0] == texts[1] == texts[2]
    assert referenced.json()["usage"]["input_tokens"] == inline.json()["usage"]["input_tokens"]


def test_a_streamed_answer_can_be_referenced_right_after_its_terminal_event(server):
    """The answer is kept before the terminal event is sent: a client that
    hangs up on it can reference the answer at once."""
    for _ in range(3):
        first = streamed_response(server, ADMIN, QUESTION)
        (message,) = first["output"]
        again = respond(server, ADMIN, second_turn({"type": "item_reference", "id": message["id"]}))
        assert again.status_code == 200, again.text


def test_unknown_and_other_users_item_references_are_404s(server):
    for unknown_id in ("msg_0123456789abcdef", "msg_" + "0" * 32, "fc_" + "0" * 32, "fc_" + "0" * 32 + "_0", "rs_x"):
        unknown = respond(server, ADMIN, second_turn({"type": "item_reference", "id": unknown_id}))
        assert unknown.status_code == 404, unknown.text
        error = unknown.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "input[1].id",
                                                                  "item_not_found")
        assert repr(unknown_id) in error["message"] and "store = false" in error["message"]  # how to do without
    for bad in ({"type": "item_reference", "id": 5}, {"type": "item_reference"}):
        refused = respond(server, ADMIN, second_turn(bad))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[1].id", refused.text
    alices = respond(server, ALICE, QUESTION).json()["output"][0]["id"]
    reference = second_turn({"type": "item_reference", "id": alices})
    assert respond(server, ALICE, reference).status_code == 200
    assert respond(server, ADMIN, reference).status_code == 200  # an unbound key reads every user's
    hidden = respond(server, BOB, reference)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "item_not_found"
