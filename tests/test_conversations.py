"""The Conversations API, through the official openai SDK over real HTTP in
front of the worker loop on the tiny engine: create (with items and
metadata), retrieve, update, delete; items added, listed as OpenAI pages
them, retrieved and deleted; `conversation` on /v1/responses reads the
conversation before the input (the same prompt as sending it all) and adds
the input and the answer after it, streamed or not; another user's
conversation is not found; bad bodies are OpenAI-shaped 4xx. And
openai-agents' OpenAIConversationsSession keeps an agent's turns in one."""

from __future__ import annotations

import httpx
import openai
import pytest
from responses_helpers import GREEDY, MODEL, WEATHER, error_of, keyed_server, sdk
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with worker_thread() as (address, _worker), keyed_server(address, tmp_path_factory.mktemp("conversations")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def texts(items) -> list[tuple[str, str]]:
    return [(item.role, item.content[0].text) for item in items]


def test_a_conversation_and_its_items(client):
    created = client.conversations.create(items=[{"role": "user", "content": "Hi"},
                                                 {"type": "message", "role": "assistant", "content": "Hello!"}],
                                          metadata={"topic": "greetings"})
    assert created.id.startswith("conv_") and created.object == "conversation"
    assert created.metadata == {"topic": "greetings"}
    assert client.conversations.retrieve(created.id).model_dump() == created.model_dump()
    updated = client.conversations.update(created.id, metadata={"topic": "weather"})
    assert updated.metadata == {"topic": "weather"} == client.conversations.retrieve(created.id).metadata

    added = client.conversations.items.create(created.id, items=[
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Rain?"}]},
        {"role": "user", "content": "Hello?", "id": "mine"}])
    assert [item.id for item in added.data][1] == "mine" and added.first_id == added.data[0].id
    listed = client.conversations.items.list(created.id, order="asc")
    assert texts(listed.data) == [("user", "Hi"), ("assistant", "Hello!"), ("user", "Rain?"), ("user", "Hello?")]
    assert listed.data[1].content[0].annotations == []  # an assistant's output_text, as OpenAI lists it
    newest_first = client.conversations.items.list(created.id)  # desc by default
    assert [item.id for item in newest_first.data] == [item.id for item in listed.data][::-1]
    paged = list(client.conversations.items.list(created.id, limit=1, order="asc"))  # the SDK follows `after`
    assert [item.id for item in paged] == [item.id for item in listed.data]
    again = client.conversations.items.create(created.id, items=[{"role": "user", "content": "x", "id": "mine"}])
    assert again.data[0].id != "mine"  # an id the conversation holds already is replaced

    item = client.conversations.items.retrieve("mine", conversation_id=created.id)
    assert item.id == "mine" and item.content[0].text == "Hello?"
    after_delete = client.conversations.items.delete("mine", conversation_id=created.id)
    assert after_delete.id == created.id
    with pytest.raises(openai.NotFoundError) as gone:
        client.conversations.items.retrieve("mine", conversation_id=created.id)
    assert error_of(gone)["code"] == "item_not_found"

    deleted = client.conversations.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    for call in (lambda: client.conversations.retrieve(created.id),
                 lambda: client.conversations.items.list(created.id),
                 lambda: client.conversations.delete(created.id)):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert error_of(missing)["code"] == "conversation_not_found"


def test_a_response_in_a_conversation_reads_it_and_adds_to_it(client):
    conversation = client.conversations.create(items=[{"role": "user", "content": "My name is Ada."}])
    first = client.responses.create(input="What is my name?", conversation=conversation.id, **GREEDY)
    assert first.conversation.id == conversation.id
    whole = client.responses.create(input=[{"role": "user", "content": "My name is Ada."},
                                           {"role": "user", "content": "What is my name?"}], **GREEDY)
    assert (first.usage.input_tokens, first.output_text) == (whole.usage.input_tokens, whole.output_text)
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert texts(items) == [("user", "My name is Ada."), ("user", "What is my name?"),
                            ("assistant", first.output_text)]
    assert items[-1].id == first.output[0].id  # the answer's item, as returned

    # streamed, and named as {"id": ...}: added before the terminal event
    events = list(client.responses.create(input="And again?", conversation={"id": conversation.id}, stream=True,
                                          **GREEDY))
    final = events[-1].response  # response.incomplete: the answer ran out of tokens
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert texts(items)[3:] == [("user", "And again?"), ("assistant", final.output_text)]
    chained = client.responses.create(input="Last?", conversation=conversation.id, **GREEDY)
    history = [{"role": role, "content": text} for role, text in texts(items)]
    resent = client.responses.create(input=[*history, {"role": "user", "content": "Last?"}], **GREEDY)
    assert chained.usage.input_tokens == resent.usage.input_tokens


def test_a_function_call_and_its_output_in_a_conversation(client):
    conversation = client.conversations.create()
    called = client.responses.create(input="Weather?", tools=[WEATHER], conversation=conversation.id,
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     **{**GREEDY, "max_output_tokens": 60})
    (call,) = called.output
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    answered = client.responses.create(input=[output], conversation=conversation.id, **GREEDY)
    whole = client.responses.create(input=[{"role": "user", "content": "Weather?"},
                                           call.model_dump(exclude_none=True), output], **GREEDY)
    assert (answered.usage.input_tokens, answered.output_text) == (whole.usage.input_tokens, whole.output_text)
    kinds = [item.type for item in client.conversations.items.list(conversation.id, order="asc").data]
    assert kinds == ["message", "function_call", "function_call_output", "message"]


def test_another_users_conversation_is_not_found(server):
    alice, bob, admin = sdk(server, "ka"), sdk(server, "kb"), sdk(server, "admin")
    mine = alice.conversations.create(items=[{"role": "user", "content": "secret"}])
    assert alice.conversations.items.list(mine.id).data[0].content[0].text == "secret"
    assert admin.conversations.retrieve(mine.id).id == mine.id  # an unbound key reads every user's
    for call in (lambda: bob.conversations.retrieve(mine.id), lambda: bob.conversations.items.list(mine.id),
                 lambda: bob.conversations.delete(mine.id),
                 lambda: bob.conversations.items.create(mine.id, items=[{"role": "user", "content": "x"}]),
                 lambda: bob.responses.create(input="Hi", conversation=mine.id, **GREEDY)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert alice.responses.create(input="Hi", conversation=mine.id, **GREEDY).conversation.id == mine.id
    unowned = admin.conversations.create()  # an unbound key's belongs to no user
    with pytest.raises(openai.NotFoundError):
        alice.conversations.retrieve(unowned.id)


def test_bad_requests_are_openai_shaped(client, server):
    def refused(path: str, body: dict, method: str = "POST") -> dict:
        answer = httpx.request(method, f"{server}{path}", json=body, headers={"authorization": "Bearer admin"})
        assert answer.status_code == 400, (path, body, answer.text)
        return answer.json()["error"]

    assert refused("/v1/conversations", {"items": [{"role": "robot", "content": "x"}]})["param"] == "items[0].role"
    assert refused("/v1/conversations", {"items": [{"type": "image_generation_call"}]})["param"] == "items[0].type"
    assert refused("/v1/conversations", {"metadata": {"k" * 65: "v"}})["param"] is not None
    assert refused("/v1/conversations", {"metadata": {str(i): "v" for i in range(17)}})["param"] is not None
    assert refused("/v1/conversations", {"unknown": 1})["code"] == "unknown_parameter"
    bare = httpx.post(f"{server}/v1/conversations", headers={"authorization": "Bearer admin"})  # no body
    assert bare.status_code == 200 and bare.json()["metadata"] == {}, bare.text
    conversation = client.conversations.create()
    assert refused(f"/v1/conversations/{conversation.id}/items", {"items": []})["param"] is not None
    assert refused(f"/v1/conversations/{conversation.id}", {})["param"] is not None  # metadata is required
    with pytest.raises(openai.BadRequestError) as bad_page:
        client.conversations.items.list(conversation.id, limit=101)
    assert error_of(bad_page)["param"] == "limit"
    with pytest.raises(openai.BadRequestError) as bad_cursor:
        client.conversations.items.list(conversation.id, after="nope")
    assert error_of(bad_cursor)["param"] == "after"
    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(input="Hi", conversation=conversation.id, previous_response_id="resp_x", **GREEDY)
    assert error_of(both)["param"] == "conversation"
    with pytest.raises(openai.BadRequestError) as bad_id:
        client.responses.create(input="Hi", conversation={"id": 5}, **GREEDY)
    assert error_of(bad_id)["param"] == "conversation.id"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(input="Hi", conversation="conv_unknown", **GREEDY)
    assert (error_of(unknown)["param"], error_of(unknown)["code"]) == ("conversation", "conversation_not_found")
    with pytest.raises(openai.NotFoundError) as dangling:  # an item_reference resolves or is a 404
        client.conversations.items.create(conversation.id, items=[{"type": "item_reference", "id": "msg_x"}])
    assert error_of(dangling)["param"] == "items[0].id"
    assert client.conversations.items.list(conversation.id).data == []  # nothing half-added


async def test_an_agent_session_keeps_its_turns_in_a_conversation(server):
    agents = pytest.importorskip("agents")
    from agents.memory import OpenAIConversationsSession

    from pydantic import BaseModel

    class Verdict(BaseModel):
        ok: bool

    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model=MODEL, openai_client=openai.AsyncOpenAI(
        base_url=f"{server}/v1", api_key="admin", max_retries=0))
    # The tiny random model never ends plain text on its own (an incomplete
    # answer, which the SDK raises on); a structured output ends with its grammar.
    agent = agents.Agent(name="judge", instructions="Answer with a verdict.", model=model, output_type=Verdict,
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=60))
    session = OpenAIConversationsSession(openai_client=openai.AsyncOpenAI(base_url=f"{server}/v1",
                                                                          api_key="admin", max_retries=0))
    first = await agents.Runner.run(agent, "My name is Ada.", session=session)
    second = await agents.Runner.run(agent, "What is my name?", session=session)
    items = await session.get_items()
    assert [item.get("role") for item in items] == ["user", "assistant", "user", "assistant"]
    assert items[0]["content"] in ("My name is Ada.", [{"type": "input_text", "text": "My name is Ada."}])
    assert isinstance(first.final_output, Verdict) and isinstance(second.final_output, Verdict)
    conversation_id = session.session_id
    assert conversation_id.startswith("conv_")
    await session.clear_session()  # deletes the conversation
    with pytest.raises(openai.NotFoundError):
        await openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="admin").conversations.retrieve(conversation_id)


def test_ids_the_store_cannot_key_and_lone_reasoning_items(client, server):
    conversation = client.conversations.create()
    for bad_id in ("a" * 129, "a\x00b"):
        for call in (lambda: client.conversations.items.create(conversation.id, items=[
                         {"role": "user", "content": "x", "id": bad_id}]),
                     lambda: client.responses.create(input=[{"role": "user", "content": "x", "id": bad_id}],
                                                      conversation=conversation.id, **GREEDY)):
            with pytest.raises(openai.BadRequestError) as refused:
                call()
            assert error_of(refused)["param"] in ("items[0].id", "input[0].id")
    for path in ("/v1/conversations/conv%00x", f"/v1/conversations/{conversation.id}/items/a%00b"):
        answer = httpx.get(f"{server}{path}", headers={"authorization": "Bearer admin"})
        assert answer.status_code == 404, (path, answer.text)
    with pytest.raises(openai.BadRequestError) as bad_after:
        client.conversations.items.list(conversation.id, after="a\x00b")
    assert error_of(bad_after)["param"] == "after"
    with pytest.raises(openai.BadRequestError) as bad_user:
        client.conversations.create(extra_body={"user": "a\x00"})
    assert error_of(bad_user)["param"] == "user"
    assert client.conversations.items.list(conversation.id).data == []
    # outside a conversation a response keeps its input as JSON: any string id
    for odd_id in ("a" * 129, "a\x00b"):
        kept = client.responses.create(input=[{"role": "user", "content": "x", "id": odd_id}], **GREEDY)
        assert client.responses.input_items.list(kept.id).data[0].id == odd_id
    # openai-agents adds a turn's items 20 at a time: a batch may hold only reasoning items
    added = client.conversations.items.create(conversation.id, items=[{"type": "reasoning", "summary": []}])
    assert added.data[0].type == "reasoning" and added.data[0].id.startswith("rs_")
    assert client.responses.create(input="Hi", conversation=conversation.id, **GREEDY).status == "incomplete"
    assert client.conversations.update(conversation.id, metadata=None).metadata == {}


def test_one_response_at_a_time_in_a_conversation_across_gateways(tmp_path):
    """Two gateways over one store: a second response in a conversation
    whose answer is still being written, through either gateway, is
    OpenAI's 400 conversation_locked (it would answer on a history about to
    change), for as long as the answer runs (its lease, 0.6 s here, is
    renewed); the conversation is free again once the first stream ends,
    even one its client left."""
    import time

    settings = ServerSettings(data_dir=tmp_path, conversation_turn_lease_s=0.6)
    with worker_thread(step_delay=0.02) as (address, _worker), \
            uvicorn_server(create_app(settings.model_copy(update={"worker_address": address}))) as url, \
            uvicorn_server(create_app(settings.model_copy(update={"worker_address": address}))) as other_url:
        slow = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        other_gateway = openai.OpenAI(base_url=f"{other_url}/v1", api_key="unused", max_retries=0)
        conversation = slow.conversations.create()
        stream = slow.responses.create(input="Tell me a story.", conversation=conversation.id, stream=True,
                                       model=MODEL, max_output_tokens=400)
        next(iter(stream))  # response.created: the turn has begun
        for gateway in (slow, other_gateway, slow):
            with pytest.raises(openai.BadRequestError) as locked:
                gateway.responses.create(input="Hi", conversation=conversation.id, **GREEDY)
            assert (error_of(locked)["code"], error_of(locked)["param"]) == ("conversation_locked", "conversation")
            time.sleep(0.7)  # past one lease: held, renewed
        other = other_gateway.conversations.create()  # other conversations are not held up
        assert other_gateway.responses.create(input="Hi", conversation=other.id, **GREEDY).status == "incomplete"
        stream.response.close()  # the client leaves mid-answer
        deadline = time.monotonic() + 30
        while True:
            try:
                other_gateway.responses.create(input="Hi", conversation=conversation.id, **GREEDY)
                break
            except openai.BadRequestError as error:
                assert error.code == "conversation_locked" and time.monotonic() < deadline
                time.sleep(0.1)
        kinds = [(item.type, getattr(item, "role", None)) for item in
                 slow.conversations.items.list(conversation.id, order="asc").data]
        assert kinds == [("message", "user"), ("message", "assistant")]  # the left turn added nothing


async def test_a_dead_gateways_turn_runs_out(tmp_path):
    """A turn whose gateway died (taken, never renewed nor given back)
    holds the conversation until its lease runs out, then no longer."""
    import asyncio

    from server.store import Store

    settings = ServerSettings(data_dir=tmp_path)
    with worker_thread() as (address, _worker), \
            uvicorn_server(create_app(settings.model_copy(update={"worker_address": address}))) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        conversation = await client.conversations.create()
        async with await Store.open(settings=settings) as dead_gateways:
            assert await dead_gateways.take_turn(conversation.id, "dead", 1.0)
        with pytest.raises(openai.BadRequestError) as locked:
            await client.responses.create(input="Hi", conversation=conversation.id, **GREEDY)
        assert error_of(locked)["code"] == "conversation_locked"
        await asyncio.sleep(1.1)
        assert (await client.responses.create(input="Hi", conversation=conversation.id, **GREEDY)).status
