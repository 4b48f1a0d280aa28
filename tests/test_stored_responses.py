"""Stored Responses API responses, through the official openai SDK over real
HTTP in front of the worker loop on the tiny engine: `store` keeps a
response, `previous_response_id` continues its conversation exactly as
sending the whole conversation would (same prompt tokens, same greedy
answer), instructions do not carry over, a function call's output names its
call; retrieve, delete, input_items (cursor pages), cancel; store false,
retention 0 and another user's response are not found; bad ids and query
parameters are OpenAI-shaped 4xx."""

from __future__ import annotations

import httpx
import openai
import pytest
from pydantic import TypeAdapter
from responses_helpers import GREEDY, MODEL, WEATHER, error_of, keyed_server, sdk
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings


@pytest.fixture(scope="module")
def worker():
    with worker_thread() as (address, _worker):
        yield address


@pytest.fixture(scope="module")
def server(worker, tmp_path_factory):
    with keyed_server(worker, tmp_path_factory.mktemp("stored")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def test_a_chained_response_answers_as_the_whole_conversation_would(client):
    first = client.responses.create(input="My name is Ada.", instructions="Be brief.", **GREEDY)
    assert first.store is True and first.previous_response_id is None
    second = client.responses.create(input="What is my name?", previous_response_id=first.id, **GREEDY)
    assert second.previous_response_id == first.id
    # instructions are the request's own: none here, as OpenAI does not carry them over
    whole = client.responses.create(input=[{"role": "user", "content": "My name is Ada."},
                                           {"role": "assistant", "content": first.output_text},
                                           {"role": "user", "content": "What is my name?"}], **GREEDY)
    assert second.usage.input_tokens == whole.usage.input_tokens
    assert second.output_text == whole.output_text
    # a third turn continues the second's whole conversation
    third = client.responses.create(input="And again?", instructions="Be kind.", previous_response_id=second.id,
                                    **GREEDY)
    whole = client.responses.create(input=[{"role": "user", "content": "My name is Ada."},
                                           {"role": "assistant", "content": first.output_text},
                                           {"role": "user", "content": "What is my name?"},
                                           {"role": "assistant", "content": second.output_text},
                                           {"role": "user", "content": "And again?"}],
                                    instructions="Be kind.", **GREEDY)
    assert (third.usage.input_tokens, third.output_text) == (whole.usage.input_tokens, whole.output_text)


def test_a_chained_turn_finds_the_conversation_in_the_prefix_cache(client):
    story = " ".join(f"Day {day}: I rode my bicycle along the river and counted {day * 3} boats." for day in range(8))
    first = client.responses.create(input=story, **GREEDY)
    chained = client.responses.create(input="How many days?", previous_response_id=first.id, **GREEDY)
    cached = chained.usage.input_tokens_details.cached_tokens
    assert first.usage.input_tokens > 96 and cached % 32 == 0  # whole 32-token blocks
    assert first.usage.input_tokens - 32 <= cached < chained.usage.input_tokens


def test_retrieve_returns_the_response_as_it_was_returned(client):
    created = client.responses.create(input="How do I sleep better?", metadata={"team": "docs"},
                                      extra_body={"preference": "short answers"}, **GREEDY)
    got = client.responses.retrieve(created.id)
    assert got.model_dump() == created.model_dump()
    assert got.model_extra["pad"]["preferences"][0]["text"] == "short answers"
    # streamed: the kept response is the terminal event's, and chaining onto it works
    events = list(client.responses.create(input="Hi", stream=True, **GREEDY))
    final = events[-1].response
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
    assert final.store is True
    chained = client.responses.create(input="More?", previous_response_id=final.id, stream=True, **GREEDY)
    assert list(chained)[-1].response.previous_response_id == final.id


def test_a_function_call_output_answers_a_call_of_the_previous_response(client):
    called = client.responses.create(input="Weather?", tools=[WEATHER],
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     **{**GREEDY, "max_output_tokens": 60})
    (call,) = called.output
    assert call.type == "function_call"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    chained = client.responses.create(input=[output], previous_response_id=called.id, **GREEDY)
    whole = client.responses.create(input=[{"role": "user", "content": "Weather?"},
                                           call.model_dump(exclude_none=True), output], **GREEDY)
    assert (chained.usage.input_tokens, chained.output_text) == (whole.usage.input_tokens, whole.output_text)


def test_an_item_reference_names_a_kept_responses_function_call(client):
    """As Codex-style clients send a conversation: the earlier call as an
    item_reference, then its output. The call is resolved to the kept one:
    the same prompt as sending it inline."""
    kept, private = (client.responses.create(input="Weather?", tools=[WEATHER], store=store,
                                             tool_choice={"type": "function", "name": "get_weather"},
                                             **{**GREEDY, "max_output_tokens": 60}) for store in (True, False))
    (call,) = kept.output
    assert call.type == "function_call" and call.id == f"fc_{kept.id.removeprefix('resp_')}_0"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    inline = client.responses.create(input=[{"role": "user", "content": "Weather?"},
                                            call.model_dump(exclude_none=True), output], **GREEDY)
    referenced = client.responses.create(input=[{"role": "user", "content": "Weather?"},
                                                {"type": "item_reference", "id": call.id}, output], **GREEDY)
    assert (referenced.usage.input_tokens, referenced.output_text) == (inline.usage.input_tokens, inline.output_text)
    listed = client.responses.input_items.list(referenced.id, order="asc").data
    assert [item.type for item in listed] == ["message", "function_call", "function_call_output"]
    assert (listed[1].id, listed[1].call_id, listed[1].name) == (call.id, call.call_id, "get_weather")
    (private_call,) = private.output
    for missing_id in (private_call.id, f"fc_{kept.id.removeprefix('resp_')}_1"):  # store false; no 2nd call
        with pytest.raises(openai.NotFoundError) as missing:
            client.responses.create(input=[{"role": "user", "content": "Weather?"},
                                           {"type": "item_reference", "id": missing_id}, output], **GREEDY)
        assert error_of(missing)["code"] == "item_not_found" and error_of(missing)["param"] == "input[1].id"


def test_input_items_are_listed_as_openai_pages_them(client):
    items = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "three"}]}]
    created = client.responses.create(input=items, **GREEDY)
    listed = client.responses.input_items.list(created.id)
    texts = [item.content[0].text for item in listed.data]
    assert texts == ["three", "two", "one"] and listed.has_more is False  # newest first by default
    assert listed.first_id == listed.data[0].id and listed.last_id == listed.data[-1].id
    from openai.types.responses import ResponseItem

    for item in listed.data:
        TypeAdapter(ResponseItem).validate_python(item.model_dump())
    assert [item.role for item in listed.data] == ["user", "assistant", "user"]
    # one item a page: the SDK follows `after` through all of them
    paged = list(client.responses.input_items.list(created.id, limit=1, order="asc"))
    assert [item.content[0].text for item in paged] == ["one", "two", "three"]
    page = client.responses.input_items.list(created.id, limit=2, order="asc")
    assert page.has_more is True and len(page.data) == 2
    # a text input is one user message
    text = client.responses.create(input="just text", **GREEDY)
    (item,) = client.responses.input_items.list(text.id).data
    assert (item.type, item.role, item.content[0].text) == ("message", "user", "just text")


def test_input_item_ids_are_strings_and_each_listed_once(client, server):
    items = [{"role": "user", "content": "a", "id": "dup"}, {"role": "user", "content": "b", "id": "dup"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "c"}]},
             {"role": "user", "content": "d", "id": "z"}]
    created = client.responses.create(input=items, **GREEDY)
    paged = list(client.responses.input_items.list(created.id, limit=1, order="asc"))
    assert [item.content[0].text for item in paged] == ["a", "b", "c", "d"]
    assert paged[0].id == "dup" and paged[1].id != "dup" and paged[3].id == "z"
    from openai.types.responses import ResponseItem

    for item in paged:  # the assistant's output_text part gets its (empty) annotations
        TypeAdapter(ResponseItem).validate_python(item.model_dump())
    refused = httpx.post(f"{server}/v1/responses", headers={"authorization": "Bearer admin"},
                         json={**GREEDY, "input": [{"role": "user", "content": "a", "id": 5}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[0].id"


def test_an_item_reference_names_a_kept_responses_message(client):
    kept, private = (client.responses.create(input="Hi", store=store, **GREEDY) for store in (True, False))
    for response in (kept, private):
        reference = [{"role": "user", "content": "Hi"}, {"type": "item_reference", "id": response.output[0].id}]
        if response is kept:
            assert client.responses.create(input=reference, **GREEDY).status in ("completed", "incomplete")
            client.responses.delete(kept.id)
        with pytest.raises(openai.NotFoundError) as missing:  # store false, or deleted
            client.responses.create(input=reference, **GREEDY)
        assert error_of(missing)["code"] == "item_not_found"


def test_a_user_longer_than_the_store_keeps_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(input="Hi", user="u" * 257, **GREEDY)
    assert error_of(refused)["param"] == "user"


def test_endpoints_this_server_lacks_are_404s_not_405s(server):
    for method, path in (("POST", "/v1/responses/compact"),
                         ("PUT", "/v1/responses/resp_x")):
        answer = httpx.request(method, f"{server}{path}", headers={"authorization": "Bearer admin"}, json={})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "unknown_url", (method, path)
    wrong = httpx.put(f"{server}/v1/chat/completions", headers={"authorization": "Bearer admin"}, json={})
    assert wrong.status_code == 405  # a served endpoint's missing method stays a 405


def test_ids_the_store_cannot_key_are_not_found(server):
    """A NUL in an id (PostgreSQL text cannot hold one) is unknown, not a 500;
    in user it is a 400."""
    for path in ("/v1/responses/resp_%00", "/v1/responses/resp_%00/input_items"):
        answer = httpx.get(f"{server}{path}", headers={"authorization": "Bearer admin"})
        assert answer.status_code == 404, (path, answer.text)
    refused = httpx.post(f"{server}/v1/responses", headers={"authorization": "Bearer admin"},
                         json={**GREEDY, "input": "Hi", "user": "a\u0000"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "user", refused.text


def test_delete_and_cancel(client, server):
    created = client.responses.create(input="Forget me.", **GREEDY)
    deleted = httpx.delete(f"{server}/v1/responses/{created.id}", headers={"authorization": "Bearer admin"})
    assert deleted.status_code == 200 and deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(created.id)
    assert error_of(gone)["code"] == "response_not_found" and error_of(gone)["param"] == "response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    with pytest.raises(openai.BadRequestError) as chained:
        client.responses.create(input="Hi", previous_response_id=created.id, **GREEDY)
    assert error_of(chained)["code"] == "previous_response_not_found"
    assert error_of(chained)["param"] == "previous_response_id"
    kept = client.responses.create(input="Keep me.", **GREEDY)
    with pytest.raises(openai.BadRequestError) as cancel:
        client.responses.cancel(kept.id)
    assert "background" in error_of(cancel)["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")


def test_store_false_keeps_nothing(client):
    created = client.responses.create(input="Private.", store=False, **GREEDY)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as chained:
        client.responses.create(input="Hi", previous_response_id=created.id, **GREEDY)
    assert error_of(chained)["code"] == "previous_response_not_found"


def test_a_users_responses_are_unknown_to_another_users_key(server):
    alice, bob, admin = sdk(server, "ka"), sdk(server, "kb"), sdk(server, "admin")
    mine = alice.responses.create(input="Alice's secret.", **GREEDY)
    assert alice.responses.retrieve(mine.id).id == mine.id and admin.responses.retrieve(mine.id).id == mine.id
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(mine.id)
    with pytest.raises(openai.BadRequestError) as chained:
        bob.responses.create(input="Tell me.", previous_response_id=mine.id, **GREEDY)
    assert error_of(chained)["code"] == "previous_response_not_found"
    assert alice.responses.create(input="Go on.", previous_response_id=mine.id, **GREEDY).status


@pytest.mark.parametrize(("path", "param"), [
    ("/v1/responses/{id}?stream=true", "stream"),
    ("/v1/responses/{id}/input_items?limit=0", "limit"),
    ("/v1/responses/{id}/input_items?limit=101", "limit"),
    ("/v1/responses/{id}/input_items?order=sideways", "order"),
    ("/v1/responses/{id}/input_items?after=msg_nothere", "after"),
])
def test_bad_query_parameters_are_400s_naming_them(client, server, path, param):
    created = client.responses.create(input="Hi", **GREEDY)
    answer = httpx.get(f"{server}{path.format(id=created.id)}", headers={"authorization": "Bearer admin"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_unknown_and_odd_ids_are_not_found(server):
    headers = {"authorization": "Bearer admin"}
    for response_id in ("resp_unknown", "x" * 500, "%FF", "résumé"):
        answer = httpx.get(f"{server}/v1/responses/{response_id}", headers=headers)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "response_not_found"
    body = {"model": MODEL, "input": "Hi", "previous_response_id": "x" * 500}
    answer = httpx.post(f"{server}/v1/responses", json=body, headers=headers)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "previous_response_not_found"
    answer = httpx.post(f"{server}/v1/responses", json={**body, "previous_response_id": 5}, headers=headers)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "previous_response_id"
    assert httpx.get(f"{server}/v1/responses/resp_unknown").status_code == 401  # a key is needed


def test_retention_zero_keeps_no_responses(worker, tmp_path):
    with pytest.raises(ValueError):  # forever is not a retention: the prune's cutoff would overflow
        ServerSettings(responses_retention_days=float("inf"))
    settings = ServerSettings(worker_address=worker, data_dir=tmp_path, responses_retention_days=0)
    with uvicorn_server(create_app(settings)) as url:
        client = sdk(url)
        created = client.responses.create(input="Hi", **GREEDY)
        assert created.store is False
        with pytest.raises(openai.NotFoundError) as missing:
            client.responses.retrieve(created.id)
        assert "PAD_RESPONSES_RETENTION_DAYS is 0" in error_of(missing)["message"]
