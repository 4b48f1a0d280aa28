"""POST /v1/responses/input_tokens through the official SDK
(`client.responses.input_tokens.count`) over real HTTP in front of the worker
loop on the tiny engine: the count is the `usage.input_tokens` a response to
the same request reports, whatever makes its input (instructions, items,
function tools, a previous response, a conversation); an input longer than
the context is counted, not refused; bad input is an OpenAI-shaped 4xx, and
another user's previous response is unknown."""

from __future__ import annotations

import httpx
import openai
import pytest
from responses_helpers import GREEDY, MODEL, WEATHER, error_of, keyed_gateway, sdk


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with keyed_gateway(tmp_path_factory.mktemp("input-tokens")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


CASES = {
    "text": {"input": "How do I sleep better?"},
    "instructions": {"input": "How do I sleep better?", "instructions": "Answer in one line."},
    "items": {"input": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
                        {"role": "user", "content": [{"type": "input_text", "text": "Bye"}]}]},
    "tools auto": {"input": "Weather in Paris?", "tools": [WEATHER]},
    "tools required": {"input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required"},
    "a call and its output": {"input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}], "tools": [WEATHER]},
    "json schema": {"input": "A city?", "text": {"format": {"type": "json_schema", "name": "city", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_count_is_what_a_response_reports(client, case):
    counted = client.responses.input_tokens.count(model=MODEL, **CASES[case])
    answered = client.responses.create(**{**GREEDY, "max_output_tokens": 1}, **CASES[case])
    assert counted.object == "response.input_tokens" and counted.input_tokens == answered.usage.input_tokens > 0


def test_a_preference_the_base_model_sees_and_truncation_count_as_a_response_reads_them(client, server):
    seen = {"input": "Hi", "extra_body": {"preference": "short answers", "pad": {"base_sees_preference": True}}}
    counted = client.responses.input_tokens.count(model=MODEL, **seen)
    answered = client.responses.create(**{**GREEDY, "max_output_tokens": 1}, **seen)
    assert counted.input_tokens == answered.usage.input_tokens > client.responses.input_tokens.count(
        model=MODEL, input="Hi").input_tokens
    # a user's stored preference, as alice's key reads it
    alice = sdk(server, "ka")
    httpx.put(f"{server}/v1/users/alice/preferences", json={"preferences": ["answer in French"]},
              headers={"Authorization": "Bearer ka"}).raise_for_status()
    pad = {"extra_body": {"pad": {"base_sees_preference": True}}}
    assert alice.responses.input_tokens.count(input="Hi", **pad).input_tokens == alice.responses.create(
        input="Hi", **{**GREEDY, "max_output_tokens": 1}, **pad).usage.input_tokens
    # truncation "auto": the items a response would keep
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 60} for i in range(15)]
    auto = {"input": long_chat, "truncation": "auto"}
    counted = client.responses.input_tokens.count(model=MODEL, **auto, extra_body={"max_output_tokens": 8})
    assert counted.input_tokens == client.responses.create(**{**GREEDY, **auto, "max_output_tokens": 8}
                                                           ).usage.input_tokens
    counted = counted.input_tokens
    assert counted < client.responses.input_tokens.count(model=MODEL, input=long_chat).input_tokens


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"extra_body": {"pad": {"reward_model": "nope"}, "preference": "short"}}, "pad.reward_model"),
])
def test_what_a_response_refuses_the_count_refuses(client, body, param):
    for call in (lambda: client.responses.input_tokens.count(model=MODEL, input="Hi", **body),
                 lambda: client.responses.create(input="Hi", **GREEDY, **body)):
        with pytest.raises(openai.APIStatusError) as refused:
            call()
        assert refused.value.status_code in (400, 404) and error_of(refused)["param"] == param


def test_a_previous_response_and_a_conversation_count_as_they_are_read(client):
    previous = client.responses.create(input="Hi there", **GREEDY)
    counted = client.responses.input_tokens.count(model=MODEL, input="And then?", previous_response_id=previous.id)
    answered = client.responses.create(input="And then?", previous_response_id=previous.id, **GREEDY)
    assert counted.input_tokens == answered.usage.input_tokens > client.responses.input_tokens.count(
        model=MODEL, input="And then?").input_tokens
    conversation = client.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi"}])
    counted = client.responses.input_tokens.count(input="More", conversation=conversation.id)  # model left out
    answered = client.responses.create(input="More", conversation=conversation.id, **GREEDY)
    assert counted.input_tokens == answered.usage.input_tokens
    # counting adds nothing to the conversation
    before = client.responses.input_tokens.count(input="More", conversation=conversation.id).input_tokens
    assert client.responses.input_tokens.count(input="More", conversation=conversation.id).input_tokens == before


def test_an_input_longer_than_the_context_is_counted(client, server):
    context = httpx.post(f"{server}/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer admin"}
                         ).json()["max_model_len"]
    counted = client.responses.input_tokens.count(model=MODEL, input="word " * (2 * context))
    assert counted.input_tokens > context


@pytest.mark.parametrize(("body", "status", "param"), [
    ({}, 400, "input"),
    ({"input": "x", "model": "nope"}, 404, "model"),
    ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, 400, "previous_response_id"),
    ({"input": "x", "conversation": "conv_unknown"}, 404, "conversation"),
    ({"input": [{"type": "item_reference", "id": "msg_unknown"}]}, 404, "input[0].id"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ({"input": "x", "unknown_field": 1}, 400, "unknown_field"),
    ({"input": 7}, 400, "input"),
])
def test_bad_input_is_an_openai_shaped_4xx(server, body, status, param):
    answer = httpx.post(f"{server}/v1/responses/input_tokens", json=body, headers={"Authorization": "Bearer admin"})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param, answer.text


def test_another_users_previous_response_is_unknown(server):
    alices = sdk(server, "ka").responses.create(input="My secret plan", user="alice", **GREEDY)
    assert sdk(server, "ka").responses.input_tokens.count(input="x", previous_response_id=alices.id).input_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(server, "kb").responses.input_tokens.count(input="x", previous_response_id=alices.id)
    assert error_of(refused)["code"] == "previous_response_not_found"
    answer = httpx.post(f"{server}/v1/responses/input_tokens", json={"input": "x"})
    assert answer.status_code == 401
