"""A conversation's turn (server/routes/conversations.py's ConversationTurns,
a lease in the store) around its edges: a client that waits for each answer
never finds its conversation locked; a caller that goes away while a turn is
being taken leaves it neither held nor the database write-locked; a turn
released from a finalizer in another thread is given back. (The lock itself
across gateways and stores is in test_conversations.py and test_store.py.)"""

from __future__ import annotations

import asyncio
import gc
import sqlite3

import openai
import pytest
from sqlalchemy import delete
from responses_helpers import GREEDY
from server_helpers import uvicorn_server, worker_thread
from store_helpers import db_url, store_config  # noqa: F401  (fixture)

from pad_core.testing import tiny_engine
from server.app import create_app
from server.routes.conversations import ConversationTurns
from server.settings import ServerSettings
from server.store import Store, schema


@pytest.mark.parametrize("stream", [False, True])
def test_a_turn_is_given_back_before_its_answer_is_returned(tmp_path, monkeypatch, stream):
    """A client that waits for each answer (the whole stream) before sending
    the next turn never sees conversation_locked, even from a store slow to
    commit (as behind a busy SQLite writer queue or a loaded PostgreSQL)."""
    end_turn = Store.end_turn

    async def slow_end_turn(self, conversation_id, token):
        await asyncio.sleep(0.5)  # a store slow to commit
        await end_turn(self, conversation_id, token)

    monkeypatch.setattr(Store, "end_turn", slow_end_turn)
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


async def test_a_turn_taken_for_a_caller_that_went_away_is_given_back(db_url):  # noqa: F811
    held_after = []
    async for k, _locked, held in _cancelled_begins(db_url):
        if held:
            held_after.append(k)
            if len(held_after) == 3:
                break
    assert held_after == [], f"begin() raised CancelledError yet held the turn (after {held_after} iterations)"


async def test_a_turn_cancelled_while_being_taken_leaves_sqlite_writable(tmp_path):
    url = f"sqlite:///{tmp_path / 'pad.db'}"
    locked_after = []
    async for k, locked, _held in _cancelled_begins(url):
        if locked:
            locked_after.append(k)
            if len(locked_after) == 3:
                break
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


async def test_a_store_write_whose_caller_went_away_runs_to_its_end(tmp_path):
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


def test_a_failed_stream_gives_its_turn_back_before_its_error_event(tmp_path, monkeypatch):
    """A client that tries again as soon as its stream failed finds the
    conversation free (and not extended by the failed turn)."""
    end_turn = Store.end_turn

    async def slow_end_turn(self, conversation_id, token):
        await asyncio.sleep(0.5)
        await end_turn(self, conversation_id, token)

    monkeypatch.setattr(Store, "end_turn", slow_end_turn)
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
