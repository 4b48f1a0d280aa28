"""Stored chat completions (`store: true`), through the official openai SDK
over real HTTP in front of the worker loop on the tiny engine: a kept
completion retrieves as it was returned (a streamed one as the object its
chunks add up to), lists in OpenAI's cursor pages filtered by model and
metadata, its metadata is replaced by update, delete forgets it, its
messages list with ids and parts; store false, retention 0 and another
user's completion are not found; bad query parameters and bodies are
OpenAI-shaped 400s. Then the store itself on SQLite and PostgreSQL: order,
cursor, filters, prune."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import openai
import pytest
from responses_helpers import MODEL, error_of, keyed_server, sdk
from server_helpers import uvicorn_server, worker_thread
from store_helpers import db_url, store_config  # noqa: F401  (fixture)

from server.app import create_app
from server.settings import ServerSettings
from server.store import InvalidInput, Store, schema

GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 5}
ADMIN = {"authorization": "Bearer admin"}


@pytest.fixture(scope="module")
def worker():
    with worker_thread() as (address, _worker):
        yield address


@pytest.fixture(scope="module")
def server(worker, tmp_path_factory):
    with keyed_server(worker, tmp_path_factory.mktemp("stored-chat")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def ask(client, text: str = "How do I sleep better?", **extra):
    return client.chat.completions.create(messages=[{"role": "user", "content": text}], **{**GREEDY, **extra})


def tag() -> dict[str, str]:
    """Metadata of this test alone, so that its lists see only its completions."""
    return {"test": uuid.uuid4().hex}


def test_a_stored_completion_retrieves_as_it_was_returned(client):
    created = ask(client, store=True, metadata={"team": "docs"}, extra_body={"preference": "short answers"})
    got = client.chat.completions.retrieve(created.id)
    assert got.model_dump(exclude={"metadata"}) == created.model_dump(exclude={"metadata"})
    assert got.metadata == {"team": "docs"}
    assert got.model_extra["pad"]["preferences"][0]["text"] == "short answers"
    assert got.choices[0].message.content and got.usage.completion_tokens == 5


def test_a_streamed_completion_is_kept_whole(client):
    stream = ask(client, store=True, n=2, stream=True, stream_options={"include_usage": True}, seed=1,
                 temperature=1.0, max_tokens=8)
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    got = client.chat.completions.retrieve(chunks[0].id)
    assert [choice.message.content for choice in got.choices] == [texts[0], texts[1]]
    assert [choice.finish_reason for choice in got.choices] == ["length", "length"]
    assert got.usage == chunks[-1].usage and got.created == chunks[0].created and got.object == "chat.completion"


def test_a_completion_without_store_is_not_kept(client):
    for created in (ask(client), ask(client, store=False, metadata={"kept": "no"})):
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.retrieve(created.id)
        assert error_of(missing)["param"] == "completion_id" and "store is true" in error_of(missing)["message"]


def test_the_list_pages_filters_and_orders(client):
    mine = tag()
    ids = [ask(client, f"Question {n}?", store=True, metadata={**mine, "parity": "even" if n % 2 == 0 else "odd"}).id
           for n in range(5)]
    ask(client, "Not listed.", store=True)  # no tag: another test's completion, as far as this list goes
    # the SDK's auto-paging follows has_more and after across pages of 2
    assert [c.id for c in client.chat.completions.list(metadata=mine, limit=2)] == ids
    assert [c.id for c in client.chat.completions.list(metadata=mine, order="desc")] == ids[::-1]
    first = client.chat.completions.list(metadata=mine, limit=2)
    assert first.has_more and [c.id for c in first.data] == ids[:2]
    assert all(c.metadata["test"] == mine["test"] for c in first.data)
    after = client.chat.completions.list(metadata=mine, after=ids[1], limit=10)
    assert [c.id for c in after.data] == ids[2:] and not after.has_more
    odd = client.chat.completions.list(metadata={**mine, "parity": "odd"})
    assert [c.id for c in odd.data] == [ids[1], ids[3]]
    assert [c.id for c in client.chat.completions.list(metadata=mine, model=MODEL)] == ids
    assert client.chat.completions.list(metadata=mine, model="another-model").data == []
    assert client.chat.completions.list(metadata={**mine, "parity": "none"}).data == []


def test_update_replaces_the_metadata(client):
    mine = tag()
    created = ask(client, store=True, metadata={**mine, "stage": "draft"})
    updated = client.chat.completions.update(created.id, metadata={**mine, "stage": "final", "by": "ada"})
    assert updated.metadata == {**mine, "stage": "final", "by": "ada"}
    assert updated.choices[0].message.content == created.choices[0].message.content
    assert [c.id for c in client.chat.completions.list(metadata={**mine, "stage": "final"})] == [created.id]
    assert client.chat.completions.list(metadata={**mine, "stage": "draft"}).data == []
    cleared = client.chat.completions.update(created.id, metadata=None)
    assert cleared.metadata == {}
    assert client.chat.completions.list(metadata=mine).data == []
    assert client.chat.completions.retrieve(created.id).metadata == {}


def test_delete_forgets_it(client):
    mine = tag()
    created = ask(client, store=True, metadata=mine)
    deleted = client.chat.completions.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "chat.completion.deleted", True)
    for call in (client.chat.completions.retrieve, client.chat.completions.delete,
                 client.chat.completions.messages.list, lambda i: client.chat.completions.update(i, metadata={})):
        with pytest.raises(openai.NotFoundError):
            call(created.id)
    assert client.chat.completions.list(metadata=mine).data == []


def test_messages_list_with_ids_and_parts(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
                 "name": "ada"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "call_1", "type": "function",
                                 "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
                {"role": "user", "content": "And now?"}]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    created = client.chat.completions.create(messages=messages, tools=tools, store=True, **GREEDY)
    listed = client.chat.completions.messages.list(created.id)
    assert [m.id for m in listed.data] == [f"{created.id}-{n}" for n in range(5)] and not listed.has_more
    system, user, assistant, tool, last = (m.model_dump() for m in listed.data)
    assert (system["role"], system["content"], system["content_parts"]) == ("system", "Be brief.", None)
    assert user["content"] == "Hello\nthere" and user["name"] == "ada"
    assert [{"type": part["type"], "text": part["text"]} for part in user["content_parts"]] == \
        [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert assistant["content"] is None and assistant["tool_calls"][0]["function"]["name"] == "get_time"
    assert tool["tool_call_id"] == "call_1" and tool["content"] == "noon"
    assert last["content"] == "And now?"
    assert [m.id for m in client.chat.completions.messages.list(created.id, order="desc")] == \
        [f"{created.id}-{n}" for n in range(4, -1, -1)]
    page = client.chat.completions.messages.list(created.id, after=f"{created.id}-1", limit=2)
    assert [m.id for m in page.data] == [f"{created.id}-2", f"{created.id}-3"] and page.has_more


def test_a_users_completions_are_unknown_to_another_users_key(server):
    alice, bob, admin = sdk(server, "ka"), sdk(server, "kb"), sdk(server, "admin")
    mine = tag()
    kept = ask(alice, "Alice's secret.", store=True, metadata=mine)
    assert alice.chat.completions.retrieve(kept.id).id == kept.id == admin.chat.completions.retrieve(kept.id).id
    for call in (bob.chat.completions.retrieve, bob.chat.completions.delete, bob.chat.completions.messages.list,
                 lambda i: bob.chat.completions.update(i, metadata={})):
        with pytest.raises(openai.NotFoundError):
            call(kept.id)
    assert bob.chat.completions.list(metadata=mine).data == []
    assert [c.id for c in alice.chat.completions.list(metadata=mine)] == [kept.id]
    assert [c.id for c in admin.chat.completions.list(metadata=mine)] == [kept.id]
    unowned = ask(admin, store=True, metadata=mine)  # the admin key's, for no user: a bound key never sees it
    assert [c.id for c in alice.chat.completions.list(metadata=mine)] == [kept.id]
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.retrieve(unowned.id)


@pytest.mark.parametrize(("path", "param"), [
    ("/v1/chat/completions?limit=0", "limit"),
    ("/v1/chat/completions?limit=101", "limit"),
    ("/v1/chat/completions?order=sideways", "order"),
    ("/v1/chat/completions?after=chatcmpl-nothere", "after"),
    ("/v1/chat/completions?metadata=team", "metadata"),
    ("/v1/chat/completions?metadata[a]=1&metadata[a]=2", "metadata"),
    ("/v1/chat/completions?" + "&".join(f"metadata[k{n}]=v" for n in range(17)), "metadata"),
    ("/v1/chat/completions/{id}/messages?limit=0", "limit"),
    ("/v1/chat/completions/{id}/messages?after={id}-9", "after"),
])
def test_bad_query_parameters_are_400s_naming_them(client, server, path, param):
    created = ask(client, store=True)
    answer = httpx.get(f"{server}{path.format(id=created.id)}", headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({}, "metadata"),
    ({"metadata": {"a": 1}}, "metadata.a"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"metadata": {str(n): "v" for n in range(17)}}, "metadata"),
    ({"metadata": {}, "model": MODEL}, "model"),
])
def test_bad_update_bodies_are_400s(client, server, body, param):
    created = ask(client, store=True)
    answer = httpx.post(f"{server}/v1/chat/completions/{created.id}", json=body, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"].startswith(param), answer.text


@pytest.mark.parametrize("metadata", [{"k" * 65: "v"}, {"k": "a\x00b"}, {"a\x00": "v"}])
def test_bad_metadata_on_create_is_a_400(client, metadata):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, store=True, metadata=metadata)
    assert error_of(refused)["param"].startswith("metadata")


def test_a_filter_no_completion_can_match_is_an_empty_page(server):
    for query in ("metadata[k]=%00", "metadata[%00]=x", "model=%00", f"metadata[k]={'v' * 600}"):
        answer = httpx.get(f"{server}/v1/chat/completions?{query}", headers=ADMIN)
        assert answer.status_code == 200 and answer.json()["data"] == [], (query, answer.text)


def test_unknown_and_odd_ids_are_not_found(server):
    for completion_id in ("chatcmpl-unknown", "x" * 500, "%00", "résumé"):
        for path in (f"/v1/chat/completions/{completion_id}", f"/v1/chat/completions/{completion_id}/messages"):
            answer = httpx.get(f"{server}{path}", headers=ADMIN)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", (path, answer.text)
    assert httpx.get(f"{server}/v1/chat/completions").status_code == 401  # a key is needed


def test_retention_zero_keeps_no_chat_completions(worker, tmp_path):
    settings = ServerSettings(worker_address=worker, data_dir=tmp_path, chat_completions_retention_days=0)
    with uvicorn_server(create_app(settings)) as url:
        client = sdk(url)
        created = ask(client, store=True, metadata={"a": "b"})
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.retrieve(created.id)
        assert "PAD_CHAT_COMPLETIONS_RETENTION_DAYS is 0" in error_of(missing)["message"]
        assert client.chat.completions.list().data == []


# ---- the store ---------------------------------------------------------------
def completion(completion_id: str, created: int, model: str = MODEL) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def test_the_store_orders_pages_filters_and_prunes(db_url):  # noqa: F811
    now = int(time.time())
    async with await Store.open(store_config(db_url, chat_completions_retention_days=1)) as store:
        # one second holds three: the order within it is the order they were kept in
        for name, created, user, metadata in (("c", now, "alice", {"k": "1", "t": "x"}), ("a", now, None, {"k": "1"}),
                                              ("b", now, "bob", {"k": "2"}), ("old", now - 100, "alice", {})):
            assert await store.record_chat_completion(completion(name, created), user=user, messages=[],
                                                      metadata=metadata)
        assert await store.record_chat_completion(completion("c", now), user="x", messages=[], metadata={"z": "z"})
        ids = lambda page: [c.completion_id for c in page[0]]  # noqa: E731
        assert ids(await store.list_chat_completions()) == ["old", "c", "a", "b"]
        assert ids(await store.list_chat_completions(descending=True)) == ["b", "a", "c", "old"]
        assert ids(await store.list_chat_completions(after="c", limit=1)) == ["a"]
        assert (await store.list_chat_completions(after="c", limit=1))[1] is True
        assert ids(await store.list_chat_completions(after="a", descending=True)) == ["c", "old"]
        assert ids(await store.list_chat_completions(metadata={"k": "1"})) == ["c", "a"]
        assert ids(await store.list_chat_completions(metadata={"k": "1", "t": "x"})) == ["c"]  # every pair
        assert ids(await store.list_chat_completions(metadata={"t": "x", "k": "2"})) == []
        many = {str(n): "v" for n in range(16)}  # the most a filter takes: one query, however many pairs
        assert ids(await store.list_chat_completions(metadata=many)) == []
        assert ids(await store.list_chat_completions(users=frozenset({"alice", "bob"}))) == ["old", "c", "b"]
        assert ids(await store.list_chat_completions(model="other")) == []
        # a cursor out of the filter (a page's last, updated since) still places the page after it
        assert ids(await store.list_chat_completions(after="a", metadata={"k": "2"})) == ["b"]
        with pytest.raises(InvalidInput, match="after: no chat completion"):
            await store.list_chat_completions(after="nothere")
        with pytest.raises(InvalidInput, match="after: no chat completion"):  # another user's is unknown
            await store.list_chat_completions(after="a", users=frozenset({"alice"}))
        assert (await store.find_chat_completion("c")).user_id == "alice"  # kept once: a second record is a no-op
        assert (await store.update_chat_completion("a", {"k": "2"})).metadata == {"k": "2"}
        assert ids(await store.list_chat_completions(metadata={"k": "2"})) == ["a", "b"]
        assert await store.update_chat_completion("gone", {}) is None
        await store.prune(now=now + 86400 - 50)  # "old" is past the retention, the others are not
        assert ids(await store.list_chat_completions()) == ["c", "a", "b"]
        assert await store.delete_chat_completion("a") and not await store.delete_chat_completion("a")
        async with store._read() as conn:
            pairs = (await conn.execute(schema.chat_completion_metadata.select())).all()
        assert sorted((p.completion_id, p.key, p.value) for p in pairs) == [("b", "k", "2"), ("c", "k", "1"),
                                                                             ("c", "t", "x")]


async def test_updates_racing_deletes_neither_fail_nor_leave_pairs_behind(db_url):  # noqa: F811
    """Every writer locks a completion before its pairs (update against
    delete in the opposite order deadlocked on PostgreSQL, and a delete
    missed the pairs an update committed meanwhile)."""
    async with await Store.open(store_config(db_url)) as store:
        for round_ in range(20):
            name = f"race-{round_}"
            await store.record_chat_completion(completion(name, int(time.time())), user=None, messages=[],
                                               metadata={"k": "0"})
            results = await asyncio.gather(store.update_chat_completion(name, {"k": "1", "j": "2"}),
                                           store.delete_chat_completion(name),
                                           store.update_chat_completion(name, {"k": "3"}),
                                           store.delete_chat_completion(name))
            assert sum(1 for r in results if r is True) == 1  # one delete found it
        async with store._read() as conn:
            assert (await conn.execute(schema.chat_completion_metadata.select())).all() == []
            assert (await conn.execute(schema.chat_completions.select())).all() == []
