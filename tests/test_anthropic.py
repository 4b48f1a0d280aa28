"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens)
through Anthropic's own SDK over real HTTP in front of the worker loop on
the tiny engine: an answer is the one the same chat gets from
/v1/chat/completions, streamed or not; stop sequences, tools (forced, named,
their results sent back), a prefilled answer and a preference do what they
do there; the count is the answer's input_tokens; every error, the body
limit's included, has Anthropic's shape and type; the key comes as
x-api-key."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from responses_helpers import MODEL, keyed_gateway, sdk

ASK = [{"role": "user", "content": "How do I sleep better?"}]
GREEDY = {"temperature": 0}  # a field Anthropic's API has dropped (its SDK too): older clients still send it
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with keyed_gateway(tmp_path_factory.mktemp("anthropic")) as url:
        yield url


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key="admin", max_retries=0)


def chat_text(server: str, messages: list, max_tokens: int, **extra_body) -> str:
    """The same chat's greedy answer from /v1/chat/completions."""
    answer = sdk(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, extra_body=extra_body)
    return answer.choices[0].message.content


def test_an_answer_is_the_chats_and_its_stream_adds_up_to_it(claude, server):
    kept = claude.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, system="Be brief.", messages=ASK)
    assert kept.type == "message" and kept.role == "assistant" and kept.id.startswith("msg_")
    assert kept.stop_reason == "max_tokens" and kept.stop_sequence is None
    assert kept.usage.output_tokens == 12 and kept.usage.input_tokens > 0
    [block] = kept.content
    assert block.type == "text" and block.text == chat_text(
        server, [{"role": "system", "content": "Be brief."}, *ASK], max_tokens=12)
    with claude.messages.stream(model=MODEL, max_tokens=12, extra_body=GREEDY, system="Be brief.", messages=ASK) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_stop" in kinds
    assert streamed.content[0].text == block.text and streamed.stop_reason == "max_tokens"
    assert (streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens, streamed.usage.output_tokens) == (
        kept.usage.input_tokens + kept.usage.cache_read_input_tokens, 12)
    counted = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=ASK)
    assert counted.input_tokens == kept.usage.input_tokens + kept.usage.cache_read_input_tokens


def test_a_stop_sequence_says_which_stopped_the_answer(claude, server):
    free = chat_text(server, ASK, max_tokens=20)
    stop = free[6:9]
    cut = claude.messages.create(model=MODEL, max_tokens=20, extra_body=GREEDY, messages=ASK,
                                 stop_sequences=["never-ever", stop])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == free[:free.find(stop)]
    with claude.messages.stream(model=MODEL, max_tokens=20, extra_body=GREEDY, messages=ASK,
                                stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence, streamed.content[0].text) == (
        "stop_sequence", stop, cut.content[0].text)


def test_a_prefilled_answer_is_continued_and_a_preference_steers_it(claude, server):
    prefill = [*ASK, {"role": "assistant", "content": "Sleep"}]
    continued = claude.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, messages=prefill)
    assert continued.content[0].text == chat_text(server, prefill, 8, continue_final_message=True,
                                                       add_generation_prompt=False)
    steered = claude.messages.create(model=MODEL, max_tokens=8, messages=ASK, extra_body={
        **GREEDY, "preference": "short answers", "pad": {"weight": 2.0}})
    assert steered.model_extra["pad"]["preferences"] == [{"text": "short answers", "weight": 1.0}]
    assert steered.model_extra["pad"]["weight"] == 2.0
    assert steered.content[0].text == chat_text(server, ASK, 8, preference="short answers",
                                                     pad={"weight": 2.0})


def test_an_output_format_makes_the_answer_json_of_its_schema(claude):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    answer = claude.messages.create(model=MODEL, max_tokens=40, messages=ASK, output_config={
        "format": {"type": "json_schema", "schema": schema}})
    assert json.loads(answer.content[0].text)["city"] in ("Paris", "Rome") and answer.stop_reason == "end_turn"


def test_tools_forced_and_named_and_their_results_sent_back(claude):
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    forced = claude.messages.create(model=MODEL, max_tokens=60, messages=asked, tools=[WEATHER],
                                    tool_choice={"type": "any"})
    [call] = forced.content
    assert forced.stop_reason == "tool_use" and call.type == "tool_use" and call.name == "get_weather"
    assert call.input["city"] in ("Paris", "Rome") and call.id
    with claude.messages.stream(model=MODEL, max_tokens=60, messages=asked, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert "input_json" in kinds and streamed.stop_reason == "tool_use"
    assert streamed.content[0].type == "tool_use" and streamed.content[0].input["city"] in ("Paris", "Rome")
    history = [*asked, {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                         {"type": "tool_use", "id": call.id, "name": call.name,
                                                          "input": call.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
                                            {"type": "text", "text": "So?"}]}]
    answered = claude.messages.create(model=MODEL, max_tokens=5, extra_body=GREEDY, messages=history, tools=[WEATHER],
                                      tool_choice={"type": "none"})
    assert answered.content[0].type == "text" and answered.stop_reason in ("end_turn", "max_tokens")
    counted = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER],
                                           tool_choice={"type": "none"})
    assert counted.input_tokens == answered.usage.input_tokens + answered.usage.cache_read_input_tokens


def test_a_tool_call_cut_short_is_the_same_tool_use_streamed_or_not(claude):
    asked = {"model": MODEL, "max_tokens": 17, "messages": [{"role": "user", "content": "Weather in Paris?"}],
             "tools": [WEATHER], "tool_choice": {"type": "any"}}
    kept = claude.messages.create(**asked)
    with claude.messages.stream(**asked) as stream:
        streamed = stream.get_final_message()
    assert kept.stop_reason == streamed.stop_reason == "max_tokens"
    assert [(b.type, b.name) for b in kept.content] == [(b.type, b.name) for b in streamed.content] == [
        ("tool_use", "get_weather")]  # never the grammar's raw JSON as text
    assert kept.content[0].input == {}  # arguments cut short do not parse


def test_turns_are_joined_and_what_is_no_turn_is_left_out(claude):
    def count(messages: list) -> int:
        return claude.messages.count_tokens(model=MODEL, messages=messages).input_tokens

    plain = count(ASK)
    assert count([{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]) == count(
        [{"role": "user", "content": "A\n\nB"}])  # one turn per role in a row, as Anthropic joins them
    assert count([*ASK, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm",
                                                             "signature": "s"}]}]) == plain  # no prefill
    assert count([*ASK, {"role": "assistant", "content": ""}]) == plain
    results = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                            {"type": "tool_result", "tool_use_id": "t2", "content": [
                                                {"type": "text", "text": "rainy"}], "is_error": True},
                                            {"type": "text", "text": "So?"}]}]
    history = [*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "t2", "name": "get_weather", "input": {"city": "Rome"}}]}, *results]
    answered = claude.messages.create(model=MODEL, max_tokens=3, messages=history, tools=[WEATHER])
    assert answered.usage.input_tokens + answered.usage.cache_read_input_tokens == claude.messages.count_tokens(
        model=MODEL, messages=history, tools=[WEATHER]).input_tokens


def test_the_user_is_pads_and_metadata_user_id_is_anthropics_opaque_id(server):
    alices = anthropic.Anthropic(base_url=server, api_key="ka", max_retries=0)  # a key bound to alice
    session = {"user_id": "user_3f2a9c_account__session_4d5e"}  # as Claude Code sends one
    assert alices.messages.create(model=MODEL, max_tokens=2, messages=ASK, metadata=session).content
    assert alices.messages.create(model=MODEL, max_tokens=2, messages=ASK, extra_body={"user": "alice"}).content
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        alices.messages.create(model=MODEL, max_tokens=2, messages=ASK, extra_body={"user": "bob"})
    assert refused.value.body["error"]["type"] == "permission_error"
    assert refused.value.request_id  # the SDK reads request-id


@pytest.mark.parametrize(("body", "status", "kind", "says"), [
    ({"model": "nope", "max_tokens": 5, "messages": ASK}, 404, "not_found_error", "nope"),
    ({"model": MODEL, "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "temperature": 1.5}, 400, "invalid_request_error",
     "temperature"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "unknown": 1}, 400, "invalid_request_error", "unknown"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}, 400,
     "invalid_request_error", "image"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{"type": "web_search_20250305",
                                                                  "name": "web_search"}]},
     400, "invalid_request_error", "client tools"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{"input_schema": {"type": "object"}}]}, 400,
     "invalid_request_error", "tools[0].name is required"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tool_choice": {"type": "any"}}, 400,
     "invalid_request_error", "needs tools"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400,
     "invalid_request_error", "role"),
    ({"model": MODEL, "max_tokens": 5, "messages": []}, 400, "invalid_request_error", "messages"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{**WEATHER, "input_schema": {"type": "string"}}]},
     400, "invalid_request_error", "tools[0].input_schema"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{**WEATHER, "input_schema": {
        "type": "object", "properties": {"city": {"type": "nonsense"}}}}], "tool_choice": {"type": "any"}},
     400, "invalid_request_error", "tools[0].input_schema"),
])
def test_errors_have_anthropics_shape_and_type(server, body, status, kind, says):
    answer = httpx.post(f"{server}/v1/messages", json=body, headers={"x-api-key": "admin"})
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and says in error["error"]["message"]
    assert set(error) == {"type", "error"} and answer.headers["x-request-id"]


def test_the_key_the_body_limit_and_an_sdk_error_class(server, claude):
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=ASK)
    assert refused.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=5, messages=ASK)
    huge = httpx.post(f"{server}/v1/messages", content=b"x" * (3 * 1024 * 1024),
                      headers={"x-api-key": "admin", "content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "request_too_large"
    assert httpx.post(f"{server}/v1/chat/completions", json={}, headers={"x-api-key": "admin"}).json()["error"][
        "param"] == "messages"  # other routes keep OpenAI's shape


def test_an_unexpected_failure_is_anthropic_shaped_too(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    app = create_app(ServerSettings(data_dir=tmp_path), start_worker=False)

    async def fails():
        raise RuntimeError("a bug")

    app.add_api_route("/v1/messages/fails", fails, methods=["POST"])
    app.add_api_route("/v1/fails", fails, methods=["POST"])
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/v1/messages/fails")
        assert answer.status_code == 500 and answer.json() == {"type": "error", "error": {
            "type": "api_error", "message": "internal server error"}}
        assert answer.headers["request-id"] == answer.headers["x-request-id"]
        assert client.post("/v1/fails").json()["error"]["type"] == "server_error"  # others: OpenAI's shape


def test_the_model_list_reads_in_anthropics_sdk(claude, server):
    listed = httpx.get(f"{server}/v1/models", headers={"x-api-key": "admin"}).json()
    assert (listed["object"], listed["has_more"], listed["first_id"], listed["last_id"]) == ("list", False, MODEL, MODEL)
    assert listed["data"][0]["type"] == "model" and listed["data"][0]["created_at"].endswith("+00:00")
    [model] = claude.models.list().data
    assert model.id == MODEL and model.type == "model" and model.display_name == MODEL
    assert claude.models.retrieve(MODEL).id == MODEL
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("nope")
