"""A conversation's turn (server/routes/conversations.py's ConversationTurns,
a lease in the store) around its edges: a client that waits for each answer
never finds its conversation locked; a caller that goes away while a turn is
being taken leaves it neither held nor the database write-locked; a turn
released from a finalizer in another thread is given back. (The lock itself
across gateways and stores is in test_conversations.py and test_store.py.)"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from responses_helpers import GREEDY
from server_helpers import uvicorn_server, worker_thread
from sqlalchemy import delete
from store_helpers import db_url, new_database_url, store_config  # noqa: F401  (fixture)

from pad_core.testing import tiny_engine
from server.app import create_app
from server.routes.conversations import ConversationTurns
from server.settings import ServerSettings
from server.store import Store, schema
from server.store.base import runs_to_its_end

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def slow_end_turn(monkeypatch):
    """A store slow to give a turn back (as behind a busy SQLite writer queue or a loaded PostgreSQL)."""
    end_turn = Store.end_turn

    async def slowly(self, conversation_id, token):
        await asyncio.sleep(0.5)
        await end_turn(self, conversation_id, token)

    monkeypatch.setattr(Store, "end_turn", slowly)


@pytest.mark.parametrize("stream", [False, True])
def test_a_turn_is_given_back_before_its_answer_is_returned(tmp_path, slow_end_turn, stream):
    """A client that waits for each answer (the whole stream) before sending
    the next turn never sees conversation_locked, even from a store slow to
    commit (as behind a busy SQLite writer queue or a loaded PostgreSQL)."""
    settings = ServerSettings(data_dir=tmp_path)
    with worker_thread() as (address, _worker), \
            uvicorn_server(create_app(settings.model_copy(update={"worker_address": address}))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        conversation = client.conversations.create()
        if stream:
            with client.responses.create(input="Hi", conversation=conversation.id, stream=True, **GREEDY) as events:
                assert list(events)[-1].type in ("response.completed", "response.incomplete")
        else:
            client.responses.create(input="Hi", conversation=conversation.id, **GREEDY)
        try:
            client.responses.create(input="And then?", conversation=conversation.id, **GREEDY)
        except openai.BadRequestError as locked:
            pytest.fail(f"the next turn, sent once the answer was in, was a 400 {locked.code}")


def _sqlite_writable(path: str) -> bool:
    """Whether another connection can start a write within a second."""
    connection = sqlite3.connect(path, timeout=1, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


async def _cancelled_begins(url: str):
    """begin() cancelled after 0, 1, 2 ... event-loop iterations, on a
    conversation nobody holds: yields (k, whether the database was left
    write-locked (SQLite), whether the turn was left held, not free within a
    second) for each begin() that ended in CancelledError."""
    store = await Store.open(store_config(url))
    turns = ConversationTurns(store, 30)
    path = url.split("///", 1)[1] if url.startswith("sqlite") else None
    try:
        conversation, _ = await store.create_conversation(user=None, metadata={})
        cid = conversation.conversation_id
        for k in range(150):
            begun = asyncio.ensure_future(turns.begin(cid))
            for _ in range(k):
                await asyncio.sleep(0)
            if begun.done():
                await (await begun).end()
                break
            begun.cancel()
            try:
                await (await begun).end()  # cancelled too late: it has the turn, given back
                continue
            except asyncio.CancelledError:
                pass
            locked = path is not None and not await asyncio.to_thread(_sqlite_writable, path)
            if locked:
                gc.collect()  # finds the abandoned connection, which closes and unlocks
            held = True  # until the turn is free: at once, or within a second (given back)
            for _ in range(50):
                if await store.take_turn(cid, "probe", 30):
                    held = False
                    break
                await asyncio.sleep(0.02)
            async with store._write() as conn:
                await conn.execute(delete(schema.conversation_turns))
            yield k, locked, held
    finally:
        await turns.close()
        await store.close()


async def _cancellations_leaving(url: str, left) -> list[int]:
    """The first three k of _cancelled_begins after which `left(locked,
    held)`: what a cancelled begin() should never leave behind."""
    found = []
    async for k, locked, held in _cancelled_begins(url):
        if left(locked, held):
            found.append(k)
            if len(found) == 3:
                break
    return found


async def test_a_turn_taken_for_a_caller_that_went_away_is_given_back(db_url):  # noqa: F811
    held_after = await _cancellations_leaving(db_url, lambda _locked, held: held)
    assert held_after == [], f"begin() raised CancelledError yet held the turn (after {held_after} iterations)"


async def test_a_turn_cancelled_while_being_taken_leaves_sqlite_writable(tmp_path):
    locked_after = await _cancellations_leaving(f"sqlite:///{tmp_path / 'pad.db'}", lambda locked, _held: locked)
    assert locked_after == [], f"the database stayed write-locked after a cancelled begin() ({locked_after})"


async def test_a_turn_released_off_the_event_loop_is_given_back(tmp_path):
    store = await Store.open(store_config(f"sqlite:///{tmp_path / 'pad.db'}"))
    turns = ConversationTurns(store, 30)
    try:
        conversation, _ = await store.create_conversation(user=None, metadata={})
        turn = await turns.begin(conversation.conversation_id)
        await asyncio.to_thread(turn.release)  # as a finalizer the garbage collector runs in another thread
        for _ in range(50):  # ample time for the turn to be given back
            await asyncio.sleep(0.01)
            await asyncio.gather(*turns._tasks)
        assert await store.take_turn(conversation.conversation_id, "next", 30) is True, \
            "released (off the loop), the turn is still held for its 30 s lease"
    finally:
        await turns.close()
        await store.close()


async def test_a_store_write_whose_caller_went_awayruns_to_its_end(tmp_path):
    """Any write, not only a turn's: cancelled after 0, 1, 2 ... event-loop
    iterations (mid-transaction among them), it is kept whole and leaves
    SQLite writable for the next writer, in this process or another. (One
    cancelled before its first step never began: nothing is kept.)"""
    path = tmp_path / "pad.db"
    store = await Store.open(store_config(f"sqlite:///{path}"))
    try:
        conversation, _ = await store.create_conversation(user=None, metadata={})
        cid = conversation.conversation_id
        cancelled = 0
        for k in range(60):
            item = {"type": "message", "role": "user", "id": f"msg_{k}", "content": [{"type": "input_text",
                                                                                    "text": f"turn {k}"}]}
            adding = asyncio.ensure_future(store.add_conversation_items(cid, [item]))
            for _ in range(k):
                await asyncio.sleep(0)
            if adding.done():
                await adding
                break
            adding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await adding
            cancelled += 1
            assert await asyncio.to_thread(_sqlite_writable, str(path)), f"write-locked, cancelled after {k}"
        await asyncio.gather(*store._unfinished_writes)
        items, _ = await store.conversation_items(cid, limit=100)
        assert cancelled > 3
        assert sorted(int(i["id"].split("_")[1]) for i in items) == list(range(1, k + 1)), \
            "every write begun, cancelled or not, kept whole"
    finally:
        await store.close()


def test_a_failed_stream_gives_its_turn_back_before_its_error_event(tmp_path, slow_end_turn):
    """A client that tries again as soon as its stream failed finds the
    conversation free (and not extended by the failed turn)."""
    engine = tiny_engine()
    choose, failures = engine._choose, [1, 1]  # the batch, then the request alone

    def failing_once(states, hidden):  # a bug the request reaches after two tokens, once
        if failures and any(len(state.generated) == 2 for state in states):
            failures.pop()
            raise RuntimeError("injected fault")
        return choose(states, hidden)

    engine._choose = failing_once
    settings = ServerSettings(data_dir=tmp_path)
    with worker_thread(engine=engine) as (address, _worker), \
            uvicorn_server(create_app(settings.model_copy(update={"worker_address": address}))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        conversation = client.conversations.create()
        with client.responses.create(input="Hi", conversation=conversation.id, stream=True, **GREEDY) as events:
            assert [event.type for event in events][-2:] == ["error", "response.failed"]
        client.responses.create(input="Hi again", conversation=conversation.id, **GREEDY)
        texts = [item.content[0].text for item in client.conversations.items.list(conversation.id, order="asc")]
        assert texts[0] == "Hi again" and len(texts) == 2


def _post_and_hang_up(url: str, path: str, body: dict, hang_up: threading.Event) -> None:
    """POSTs `body` over a raw socket and closes it once `hang_up` is set (a client that goes away)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert hang_up.wait(30), "the answer never began to join its conversation"
    finally:
        sock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_hung_up_turn_is_given_back_only_once_its_answer_joined_the_conversation(tmp_path, monkeypatch, stream):
    """A client that hangs up while its answer is being added to the
    conversation: the add runs on (shielded) and the turn is given back
    only after it (Turn.end_after), so the next turn finds the conversation
    locked until then, then answers on a history holding the hung-up turn,
    in order. (Found in review: the turn was given back at once; on
    PostgreSQL, with no gateway-side write lock, the next turn could answer
    without the hung-up turn's items, which then joined after its own. Here
    the add is held back 1 s before it starts, as a busy pool does.)"""
    url, cleanup = new_database_url("postgresql", tmp_path)
    raw_add = Store.add_conversation_items.__wrapped__
    slowed: dict[str, threading.Event] = {}

    async def add_slowly(self, conversation_id, items):
        started = slowed.pop(conversation_id, None)
        if started is not None:
            started.set()
            await asyncio.sleep(1.0)  # not yet at the conversation's row lock
        return await raw_add(self, conversation_id, items)

    monkeypatch.setattr(Store, "add_conversation_items", runs_to_its_end(add_slowly))
    settings = ServerSettings(data_dir=tmp_path, db_url=url)
    try:
        with worker_thread() as (address, _), \
                uvicorn_server(create_app(settings.model_copy(update={"worker_address": address}))) as base:
            greedy = {"model": MODEL, "temperature": 0, "max_output_tokens": 4}
            fresh = httpx.post(f"{base}/v1/conversations", json={}, timeout=30).json()["id"]
            alone = httpx.post(f"{base}/v1/responses", json={**greedy, "input": "And then?", "conversation": fresh},
                               timeout=60).json()["usage"]["input_tokens"]

            conversation = httpx.post(f"{base}/v1/conversations", json={}, timeout=30).json()["id"]
            adding = slowed[conversation] = threading.Event()
            _post_and_hang_up(base, "/v1/responses", {**greedy, "input": "Hi", "conversation": conversation,
                                                                "stream": stream}, adding)
            deadline = time.monotonic() + 20
            while True:  # the next turn, as soon as the conversation is free
                answer = httpx.post(f"{base}/v1/responses",
                                    json={**greedy, "input": "And then?", "conversation": conversation}, timeout=60)
                if answer.status_code != 400 or answer.json()["error"]["code"] != "conversation_locked":
                    break
                assert time.monotonic() < deadline, "the conversation stayed locked"
                time.sleep(0.05)
            assert answer.status_code == 200, answer.text
            time.sleep(1.5)  # the hung-up turn's add is in by now
            items = httpx.get(f"{base}/v1/conversations/{conversation}/items", params={"order": "asc"},
                              timeout=30).json()["data"]
            assert answer.json()["usage"]["input_tokens"] > alone, \
                "the next turn answered on a history without the hung-up turn's items, which joined it after"
            assert [item["content"][0]["text"] for item in items][::2] == ["Hi", "And then?"], \
                "the conversation's items out of order: the next turn's before the hung-up one's"
    finally:
        cleanup()
