"""The store on SQLite and on a real PostgreSQL server: profile CRUD,
bounds, verbatim texts, resolution order, completions + feedback + export
into valid training pairs, retention, migrations, 16 concurrent writers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from store_helpers import db_url, store_config  # noqa: F401  (fixture)

from pad_core.training.pairs import load_pairs
from pad_core.types import Preference
from server.store import (
    UNSET,
    Forbidden,
    InvalidInput,
    NotFound,
    Store,
    resolve_for_request,
    resolve_preferences,
)
from server.store import schema
from server.store.errors import SchemaTooNew
from server.store.export import main as feedback_main

WEIRD = ["  leading and trailing spaces  ", "tab\tnew\nline \x00 nul", "émoji 😀 and 中文", "a" * 2000, 'quotes "\' \\ ']
HI = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "How do I sleep better?"}]


@pytest.fixture
async def store(db_url):  # noqa: F811
    store = await Store.open(store_config(db_url))
    yield store
    await store.close()


async def test_profile_crud_and_verbatim(store):
    with pytest.raises(NotFound):
        await store.get_preferences("alice")
    assert await store.find_preferences("alice") is None
    created = await store.put_preferences("alice", [WEIRD[0], {"text": WEIRD[1], "weight": 2}, *WEIRD[2:]])
    got = await store.get_preferences("alice")
    assert [p.text for p in got.preferences] == WEIRD
    assert [p.weight for p in got.preferences] == [1.0, 2.0, 1.0, 1.0, 1.0]
    assert got.created_at == created.created_at and got.updated_at >= got.created_at

    replaced = await store.put_preferences("alice", ["short answers"])
    assert replaced.created_at == created.created_at
    assert (await store.find_preferences("alice")) == [Preference("short answers", 1.0)]

    patched = await store.patch_preferences(
        "alice", add=[{"text": "short answers", "weight": 0.5}, "humour"], remove=["not there"]
    )
    assert patched.preferences == [Preference("short answers", 0.5), Preference("humour", 1.0)]
    patched = await store.patch_preferences("alice", remove=["short answers"])
    assert (await store.get_preferences("alice")).preferences == [Preference("humour", 1.0)]
    assert patched.to_openai()["preferences"] == [{"text": "humour", "weight": 1.0}]

    await store.delete_preferences("alice")
    for call in (store.get_preferences("alice"), store.delete_preferences("alice"), store.patch_preferences("alice", add=["x"])):
        with pytest.raises(NotFound):
            await call
    # other users untouched, empty profiles allowed
    await store.put_preferences("bob", [])
    assert (await store.get_preferences("bob")).preferences == []


async def test_bounds(store):
    limit = store.config.max_preferences
    cases = {
        "too_many_preferences": [f"p{i}" for i in range(limit + 1)],
        "preference_too_long": ["a" * (store.config.max_preference_chars + 1)],
        "empty_preference": ["   "],
        "duplicate_preference": ["x", "x"],
    }
    for code, prefs in cases.items():
        with pytest.raises(InvalidInput) as info:
            await store.put_preferences("alice", prefs)
        assert info.value.code == code and info.value.status == 400
    for bad in ("a string", [1], [{"text": "x", "weight": float("nan")}], [{"text": "x", "extra": 1}], [{"weight": 1}]):
        with pytest.raises(InvalidInput):
            await store.put_preferences("alice", bad)
    with pytest.raises(InvalidInput):
        await store.put_preferences("u" * 300, ["x"])
    await store.put_preferences("alice", [f"p{i}" for i in range(limit)])
    with pytest.raises(InvalidInput) as info:
        await store.patch_preferences("alice", add=["one more"])
    assert info.value.code == "too_many_preferences"
    assert len((await store.get_preferences("alice")).preferences) == limit  # refused PATCH changed nothing


def test_resolution_order():
    stored = [Preference("stored", 1.0)]
    assert resolve_preferences(UNSET, stored).preferences == stored
    assert resolve_preferences(UNSET, stored).source == "profile"
    request = resolve_preferences("inline", stored)
    assert request.preferences == [Preference("inline")] and request.source == "request"
    listed = resolve_preferences([{"text": "a", "weight": 2}, "b"], stored)
    assert listed.preferences == [Preference("a", 2.0), Preference("b", 1.0)]
    for off in (None, "", []):
        assert resolve_preferences(off, stored).preferences == []
        assert resolve_preferences(off, stored).source == "none"
    assert resolve_preferences(UNSET, None).source == "none"
    assert resolve_preferences(UNSET, []).source == "none"


async def test_resolution_with_store(store):
    await store.put_preferences("alice", ["stored one"])
    assert (await resolve_for_request(store, "alice")).preferences == [Preference("stored one")]
    assert (await resolve_for_request(store, "alice", "inline")).preferences == [Preference("inline")]
    assert (await resolve_for_request(store, "alice", None)).preferences == []
    assert (await resolve_for_request(store, "nobody")).source == "none"
    assert (await resolve_for_request(store, None)).source == "none"
    assert (await resolve_for_request(None, "alice")).source == "none"


async def _seed(store, prefs=(Preference("short answers"),)):
    other_prompt = [{"role": "user", "content": "Another question"}]
    await store.record_completion("c-a", messages=HI, answers=["A short answer.", "A long, long answer."],
                                  preferences=list(prefs), user="alice", model="m")
    await store.record_completion("c-b", messages=HI, answers=["B answer"], preferences=list(prefs), user="alice")
    await store.record_completion("c-c", messages=HI, answers=["C answer"], preferences=list(prefs), user="alice")
    await store.record_completion("c-x", messages=other_prompt, answers=["X"], preferences=list(prefs), user="bob")
    await store.record_completion("c-plain", messages=HI, answers=["plain"], preferences=[], user="alice")


async def test_feedback_and_export_round_trip(store, db_url, tmp_path):  # noqa: F811
    await _seed(store)
    kept = await store.get_completion("c-a", 1)
    assert kept.messages == HI and kept.answer == "A long, long answer." and kept.user_id == "alice"
    # pairwise: choice 0 of c-a over choice 1; ratings: c-b up, c-c down (-> c-b over c-c)
    fb = await store.record_feedback("c-a", rating=5, preferred_over="c-a", preferred_over_choice_index=1,
                                     comment="shorter is better")
    assert fb.to_openai()["object"] == "feedback" and fb.rating == 5 and fb.user_id == "alice"
    await store.record_feedback("c-b", rating="up")
    await store.record_feedback("c-c", rating="down")
    await store.record_feedback("c-c", rating="up")  # the latest rating counts ...
    await store.record_feedback("c-c", rating=1)  # ... so c-c is at 1 star
    await store.record_feedback("c-x", rating="up")  # alone in its group: no pair
    await store.record_feedback("c-plain", preferred_over="c-b")  # plain chosen: the preference of the rejected
    result = await store.export_pairs()
    by_ids = {(p["meta"]["chosen_id"], p["meta"]["rejected_id"]): p for p in result.pairs}
    assert set(by_ids) == {
        ("c-a:0", "c-a:1"),  # pairwise
        ("c-a:0", "c-c:0"),  # ratings: 5 stars over 1 star (5 stars and thumbs up tie: no pair)
        ("c-b:0", "c-c:0"),  # ratings: up over 1 star
        ("c-plain:0", "c-b:0"),  # pairwise
    }
    pair = by_ids[("c-a:0", "c-a:1")]
    assert pair["messages"] == HI and pair["preference"] == "short answers"
    assert (pair["chosen"], pair["rejected"]) == ("A short answer.", "A long, long answer.")
    assert by_ids[("c-plain:0", "c-b:0")]["preference"] == "short answers"
    assert by_ids[("c-plain:0", "c-b:0")]["meta"]["source"] == "pairwise"

    out = tmp_path / "pairs.jsonl"
    assert await asyncio.to_thread(feedback_main, ["export", "--out", str(out), "--db-url", db_url]) == 0
    pairs = load_pairs(out)  # the `pad train` reader: every line a valid pair
    assert len(pairs) == len(result.pairs)
    assert pairs[0].to_json() == {k: result.pairs[0][k] for k in ("messages", "preference", "chosen", "rejected")}
    only_bob = tmp_path / "bob.jsonl"
    args = ["export", "--out", str(only_bob), "--db-url", db_url, "--user", "bob"]
    assert await asyncio.to_thread(feedback_main, args) == 0
    assert only_bob.read_text() == ""


async def test_export_skips_unusable_pairs(store):
    await store.record_completion("p1", messages=HI, answers=["same", "same", "other"], preferences=[])
    await store.record_feedback("p1", preferred_over="p1", preferred_over_choice_index=2)  # no preference
    await store.record_completion("q1", messages=HI, answers=["same", "same"], preferences=[Preference("x")])
    await store.record_feedback("q1", preferred_over="q1", preferred_over_choice_index=1)  # equal answers
    result = await store.export_pairs()
    assert result.pairs == [] and result.skipped == {"no_preference": 1, "same_answer": 1}


async def test_feedback_errors(store):
    await _seed(store)
    with pytest.raises(NotFound) as info:
        await store.record_feedback("nope", rating="up")
    assert info.value.code == "completion_not_found" and info.value.param == "completion_id"
    with pytest.raises(NotFound):
        await store.record_feedback("c-a", choice_index=7, rating="up")
    with pytest.raises(NotFound) as info:
        await store.record_feedback("c-a", preferred_over="nope")
    assert info.value.param == "preferred_over"
    for kwargs in ({"rating": 6}, {"rating": "meh"}, {"rating": True}, {}, {"comment": 3}, {"comment": "x" * 5000},
                   {"preferred_over": "c-a"}, {"preferred_over": "c-x"}):
        with pytest.raises(InvalidInput):
            await store.record_feedback("c-a", **kwargs)
    only_bob = lambda user: user == "bob"  # noqa: E731
    with pytest.raises(Forbidden):
        await store.record_feedback("c-a", rating="up", can_access=only_bob)
    assert (await store.record_feedback("c-x", rating=3, can_access=only_bob)).rating == 3
    assert len(await store.list_feedback()) == 1  # refused ones wrote nothing


async def test_retention(db_url):  # noqa: F811
    store = await Store.open(store_config(db_url, feedback_retention_days=1))
    try:
        old = int(time.time()) - 3 * 86400
        store._next_prune = float("inf")  # no automatic pruning until asked
        await store.record_completion("old", messages=HI, answers=["a"], preferences=[Preference("p")], created=old)
        await store.record_completion("new", messages=HI, answers=["b"], preferences=[Preference("p")])
        await store.record_feedback("new", preferred_over="old")
        await store.record_feedback("old", rating="up")
        assert await store.prune() == 1
        with pytest.raises(NotFound):
            await store.get_completion("old")
        assert (await store.get_completion("new")).answer == "b"
        assert await store.list_feedback() == []  # feedback on pruned completions goes with them
        store._next_prune = 0.0  # due: the next record prunes by itself
        await store.record_completion("old2", messages=HI, answers=["a"], created=old)
        with pytest.raises(NotFound):
            await store.get_completion("old2")
    finally:
        await store.close()
    off = await Store.open(store_config(db_url, feedback_retention_days=0))
    try:
        assert await off.record_completion("x", messages=HI, answers=["a"]) is False
        with pytest.raises(NotFound):
            await off.get_completion("x")
    finally:
        await off.close()


async def test_migrations(db_url):  # noqa: F811
    first = await Store.open(store_config(db_url))
    await first.put_preferences("alice", ["kept"])
    second = await Store.open(store_config(db_url))  # a second process: no re-migration, data kept
    assert (await second.get_preferences("alice")).preferences == [Preference("kept")]
    async with second.engine.begin() as conn:
        assert (await conn.execute(schema.schema_version.select())).all() == [(schema.LATEST,)]
        await conn.execute(schema.schema_version.update().values(version=schema.LATEST + 1))
    await first.close()
    await second.close()
    with pytest.raises(SchemaTooNew):
        await Store.open(store_config(db_url))


async def test_sqlite_is_wal_and_synchronous_full(tmp_path):
    store = await Store.open(store_config(f"sqlite:///{tmp_path / 'sub' / 'pad.db'}"))
    try:
        async with store.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2  # FULL
    finally:
        await store.close()


async def test_sixteen_concurrent_writers_lose_nothing(db_url):  # noqa: F811
    store = await Store.open(store_config(db_url, max_preferences=64))
    try:
        await store.put_preferences("shared", [])
        await store.record_completion("c", messages=HI, answers=["a"], preferences=[Preference("p")], user="shared")

        async def writer(i: int) -> None:
            for j in range(4):
                await store.put_preferences(f"user-{i}-{j}", [f"pref {i} {j}"])
                await store.patch_preferences("shared", add=[f"from {i} {j}"])  # read-modify-write, same row
            await store.record_feedback("c", rating=1 + i % 5, comment=f"writer {i}")

        await asyncio.gather(*(writer(i) for i in range(16)))
        for i in range(16):
            for j in range(4):
                assert (await store.get_preferences(f"user-{i}-{j}")).preferences == [Preference(f"pref {i} {j}")]
        shared = {p.text for p in (await store.get_preferences("shared")).preferences}
        assert shared == {f"from {i} {j}" for i in range(16) for j in range(4)}
        assert sorted(f.comment for f in await store.list_feedback()) == sorted(f"writer {i}" for i in range(16))
    finally:
        await store.close()


def test_feedback_cli_arguments(tmp_path, capsys):
    db = tmp_path / "data"
    assert feedback_main(["--data-dir", str(db), "--out", str(tmp_path / "a.jsonl")]) == 0  # "export" implied
    assert (db / "pad.db").exists() and (tmp_path / "a.jsonl").read_text() == ""
    assert feedback_main(["prune", "--data-dir", str(db)]) == 0
    assert feedback_main(["export", "--db-url", "mysql://x/y", "--out", "-"]) == 2
    assert "unsupported database" in capsys.readouterr().err


async def test_responses_round_trip_retention_and_delete(db_url):  # noqa: F811
    store = await Store.open(store_config(db_url, responses_retention_days=1))
    try:
        store._next_prune = float("inf")  # no automatic pruning until asked
        old = int(time.time()) - 3 * 86400
        conversation = [{"role": "user", "content": WEIRD[1]}, {"role": "assistant", "content": WEIRD[2]}]
        kept = {"id": "resp_new", "object": "response", "created_at": int(time.time()), "output": [], "note": WEIRD[4]}
        assert await store.record_response(kept, user="alice", conversation=conversation,
                                           call_names={"call_1": "get_weather"}, input_items=[{"id": "msg_1"}])
        await store.record_response({**kept, "id": "resp_old", "created_at": old}, user=None,
                                    conversation=conversation, call_names={}, input_items=[])
        found = await store.find_response("resp_new")
        assert (found.user_id, found.response, found.conversation) == ("alice", kept, conversation)
        assert await store.find_response("resp_old") is None  # expired, pruned or not
        many = await store.find_responses([f"resp_{i}" for i in range(1200)] + ["resp_new", "resp_old", "", 7])
        assert list(many) == ["resp_new"]
        assert (found.call_names, found.input_items) == ({"call_1": "get_weather"}, [{"id": "msg_1"}])
        await store.prune()
        assert await store.find_response("resp_old") is None and await store.find_response("resp_new")
        assert await store.delete_response("resp_new") is True and await store.delete_response("resp_new") is False
        assert await store.find_response("resp_new") is None
    finally:
        await store.close()
    off = await Store.open(store_config(db_url, responses_retention_days=0))
    try:
        assert off.keeps_responses is False
        assert await off.record_response(kept, user=None, conversation=[], call_names={}, input_items=[]) is False
    finally:
        await off.close()


async def test_a_streamed_background_responses_events_are_kept_read_in_order_and_go_with_it(db_url):  # noqa: F811
    from server.store.records import ResponseEvent

    store = await Store.open(store_config(db_url, responses_retention_days=1))
    try:
        store._next_prune = float("inf")
        old = int(time.time()) - 3 * 86400
        for response_id, created in (("resp_new", int(time.time())), ("resp_old", old)):
            await store.record_response({"id": response_id, "created_at": created, "output": []}, user=None,
                                        conversation=[], call_names={}, input_items=[])
            events = [ResponseEvent(n, "response.output_text.delta", f"event: x\ndata: {WEIRD[n % 5]!r}\n\n")
                      for n in range(1200)]
            await store.append_response_events(response_id, events[:700])
            await store.append_response_events(response_id, events[690:])  # numbers kept already stay as they were
        assert await store.last_response_event("resp_new") == events[-1] and await store.last_response_event("x") is None
        page = await store.response_events("resp_new", after=99, limit=500)
        assert [e.sequence_number for e in page] == list(range(100, 600)) and page[0] == events[100]
        assert await store.response_events("resp_new", after=2**31 - 1) == []
        assert not await store.background_running("resp_new")
        await store.begin_background("resp_new", "token", 30)
        assert await store.background_running("resp_new")
        await store.end_background("resp_new", "token")
        assert not await store.background_running("resp_new")
        await store.prune()  # resp_old is past its retention: its events go with it
        assert await store.last_response_event("resp_old") is None and await store.last_response_event("resp_new")
        await store.delete_response("resp_new")
        assert await store.response_events("resp_new") == []
        await store.append_response_events("resp_new", events[:3])  # a run still writing: not kept any more
        assert await store.last_response_event("resp_new") is None
    finally:
        await store.close()


async def test_a_version_1_database_migrates_to_keep_responses(db_url):  # noqa: F811
    from sqlalchemy.ext.asyncio import create_async_engine

    from server.store.config import normalize_url

    engine = create_async_engine(normalize_url(db_url))
    async with engine.begin() as conn:  # the schema as the first release left it, with a profile in it
        await conn.run_sync(schema.schema_version.create)
        await conn.execute(schema.schema_version.insert().values(version=1))
        await conn.run_sync(schema.MIGRATIONS[0])
        await conn.execute(schema.user_profiles.insert().values(user_id="alice", preferences='[{"text": "kept", '
                                                                 '"weight": 1.0}]', created_at=1, updated_at=1))
    await engine.dispose()
    store = await Store.open(store_config(db_url))
    try:
        assert (await store.get_preferences("alice")).preferences == [Preference("kept")]
        await store.record_response({"id": "resp_1", "created_at": 1_900_000_000, "output": []}, user=None,
                                    conversation=[], call_names={}, input_items=[])
        assert (await store.find_response("resp_1")).response["id"] == "resp_1"
    finally:
        await store.close()


async def test_a_version_2_database_migrates_to_keep_conversations(db_url):  # noqa: F811
    from sqlalchemy.ext.asyncio import create_async_engine

    from server.store.config import normalize_url

    engine = create_async_engine(normalize_url(db_url))
    async with engine.begin() as conn:  # the schema as the stored-responses release left it
        await conn.run_sync(schema.schema_version.create)
        await conn.execute(schema.schema_version.insert().values(version=2))
        await conn.run_sync(schema.MIGRATIONS[0])
        await conn.run_sync(schema.MIGRATIONS[1])
    await engine.dispose()
    store = await Store.open(store_config(db_url))
    try:
        conversation, kept = await store.create_conversation(user="alice", metadata={"k": "v"},
                                                             items=[{"id": "a", "type": "message"}])
        assert kept == [{"id": "a", "type": "message"}]
        assert await store.find_conversation(conversation.conversation_id) == conversation
        assert await store.take_turn(conversation.conversation_id, "t", 30) is True  # schema v4's turns
    finally:
        await store.close()


async def test_a_version_7_databases_running_batch_is_claimed_once_and_ended_with_its_results(db_url):  # noqa: F811
    """A batch left running by a gateway of schema v7 (no key scope stored)
    is orphaned once its lease ran out; of two stores claiming it at once one
    wins; results are stored only by the lease's holder, read back a page at
    a time in input order, and moved into files when the batch ends."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from server.batches import new_batch
    from server.store.config import normalize_url
    from server.store.records import StoredFile

    batch = {**new_batch("file-in", "/v1/chat/completions", None), "status": "in_progress"}
    engine = create_async_engine(normalize_url(db_url))
    async with engine.begin() as conn:  # the schema as the Batch API's first release left it
        await conn.run_sync(schema.schema_version.create)
        await conn.execute(schema.schema_version.insert().values(version=7))
        for step in schema.MIGRATIONS[:7]:
            await conn.run_sync(step)
        await conn.execute(text("DROP INDEX ix_batches_lease"))  # new in v8, as files.expires_at
        await conn.execute(text("DROP INDEX ix_files_expiry"))
        await conn.execute(text("ALTER TABLE files DROP COLUMN expires_at"))
        await conn.execute(text("INSERT INTO files (file_id, purpose, filename, bytes, created_at, content) "
                                "VALUES ('file-v7', 'batch', 'in.jsonl', 2, 1, :content)"), {"content": b"{}"})
        await conn.execute(schema.batches.insert().values(
            batch_id=batch["id"], user_id=None, batch=json.dumps(batch), created_at=batch["created_at"],
            token="v7-gateway", expires_at_ms=int(time.time() * 1000) - 1, cancel_requested=0))
    await engine.dispose()
    first, second = await Store.open(store_config(db_url)), await Store.open(store_config(db_url))
    try:
        assert (await first.find_file("file-v7")).expires_at is None  # kept until deleted, as v7 kept it
        assert await first.orphaned_batches() == [batch["id"]]
        claims = await asyncio.gather(*(store.claim_batch(batch["id"], f"t{i}", 30)
                                        for i, store in enumerate([first, second] * 4)))
        [claimed] = [c for c in claims if c is not None]
        token = next(f"t{i}" for i, c in enumerate(claims) if c is not None)
        assert claimed.has_scope is False and claimed.stored.running and not claimed.cancel_requested
        assert await first.orphaned_batches() == []
        assert await first.update_batch(batch, "v7-gateway", [(1, True, "{}")]) is False  # not the holder
        assert await first.batch_progress(batch["id"]) == (0, 0, 0)
        results = [(n, n % 3 != 0, json.dumps({"n": n})) for n in range(1, 8)]
        assert await second.update_batch(batch, token, results[:4]) and await first.update_batch(
            batch, token, results[4:])
        assert await first.batch_progress(batch["id"]) == (7, 5, 2)
        page = await first.batch_results(batch["id"], ok=True, after_line=1, limit=2)
        assert page == [(2, '{"n": 2}'), (4, '{"n": 4}')]
        assert [n for n, _ in await first.batch_results(batch["id"], ok=False, after_line=0, limit=9)] == [3, 6]
        assert await second.request_batch_cancel(batch["id"]) is True  # running: asked
        asked = (await first.find_batch(batch["id"])).batch
        assert asked["status"] == "cancelling" and asked["cancelling_at"] >= int(time.time()) - 5
        assert await first.update_batch(batch, token)  # its runner, before it has read the ask
        assert (await first.find_batch(batch["id"])).batch == asked
        await first.release_batch(batch["id"], token)  # its gateway stops
        [again] = [c for c in [await second.claim_batch(batch["id"], "t-next", 30)] if c]  # at once
        assert again.cancel_requested
        output = StoredFile("file-out", None, "batch_output", "out.jsonl", 2, 1)
        assert not await first.end_batch({**batch, "status": "cancelled"}, token, [(output, b"{}")])
        assert await first.end_batch({**batch, "status": "cancelled"}, "t-next", [(output, b"{}")])
        assert (await second.find_batch(batch["id"])).batch["status"] == "cancelled"
        assert await second.file_content("file-out") == b"{}"
        assert await first.batch_progress(batch["id"]) == (0, 0, 0)  # moved into the files
        assert await first.request_batch_cancel(batch["id"]) is False and await first.orphaned_batches() == []
    finally:
        await first.close()
        await second.close()


async def test_expired_files_are_gone_at_once_and_pruned_but_a_running_batchs_input(store):
    from server.batches import new_batch
    from server.store.records import StoredFile

    now = int(time.time())
    for file_id, expires in (("file-old", now - 10), ("file-input", now - 10), ("file-new", now + 3600),
                             ("file-kept", None)):
        await store.record_file(StoredFile(file_id, None, "batch", "f.jsonl", 2, now - 20, expires), b"{}")
    running = {**new_batch("file-input", "/v1/chat/completions", None), "status": "in_progress"}
    await store.create_batch(running, user=None, token="t", lease_s=30, key_id=None, users=None)
    assert await store.find_file("file-old") is None and await store.file_content("file-old") is None
    listed, _ = await store.list_files(users=None, purpose=None, after=None, limit=10, descending=False)
    assert [f.file_id for f in listed] == ["file-new", "file-kept"]
    await store.prune()
    assert await store.file_content("file-old", expired_too=True) is None  # pruned
    assert await store.file_content("file-input", expired_too=True) == b"{}"  # its batch still runs
    assert await store.end_batch({**running, "status": "completed"}, "t", [])
    await store.prune()
    assert await store.file_content("file-input", expired_too=True) is None
    assert await store.file_content("file-new") == await store.file_content("file-kept") == b"{}"


async def test_one_turn_at_a_time_in_a_conversation_across_stores(db_url):  # noqa: F811
    """Two gateways (two Stores over one database), 8 tasks each, taking one
    conversation's turn at once: exactly one gets it. Renewed by its
    holder only; given back, or run out, it can be taken again; a holder
    whose lease ran out and was taken renews and gives back nothing; a
    deleted conversation has no turn to take."""
    first, second = await Store.open(store_config(db_url)), await Store.open(store_config(db_url))
    try:
        conversation, _ = await first.create_conversation(user=None, metadata={})
        cid = conversation.conversation_id
        taken = await asyncio.gather(*(store.take_turn(cid, f"{n}-{i}", 30)
                                       for n, store in enumerate((first, second)) for i in range(8)))
        assert taken.count(True) == 1 and taken.count(False) == 15
        holder = f"{taken.index(True) // 8}-{taken.index(True) % 8}"
        assert await second.renew_turn(cid, holder, 30) and not await second.renew_turn(cid, "someone", 30)
        await first.end_turn(cid, "someone")  # not the holder's: nothing given back
        assert await first.take_turn(cid, "late", 30) is False
        await first.end_turn(cid, holder)
        assert await second.take_turn(cid, "next", 0.05) is True
        await asyncio.sleep(0.1)  # its lease runs out (its gateway died)
        assert await first.take_turn(cid, "after", 30) is True
        assert not await second.renew_turn(cid, "next", 30)
        await second.end_turn(cid, "next")  # the stale holder gives back nothing
        assert await second.take_turn(cid, "again", 30) is False
        assert await first.delete_conversation(cid)
        assert await first.take_turn(cid, "gone", 30) is None and not await first.renew_turn(cid, "after", 30)
    finally:
        await first.close()
        await second.close()


async def test_conversation_items_in_order_under_concurrent_writers(store):
    """16 writers appending to one conversation at once: every item kept,
    each writer's in its order, positions unique (the conversation row is
    locked); ids the conversation holds already are replaced; pages in both
    orders; deleting the conversation deletes its items."""
    conversation, _ = await store.create_conversation(user=None, metadata={})
    cid = conversation.conversation_id

    async def writer(w: int) -> list[dict]:
        items = [{"id": f"w{w}-{i}", "type": "message", "n": i} for i in range(5)]
        return await store.add_conversation_items(cid, items)

    added = await asyncio.gather(*(writer(w) for w in range(16)))
    assert all(len(batch) == 5 for batch in added)
    everything, more = await store.conversation_items(cid)
    assert len(everything) == 80 and not more
    for w in range(16):
        assert [item["n"] for item in everything if item["id"].startswith(f"w{w}-")] == list(range(5))
    # each writer's batch is contiguous (one transaction)
    starts = [[item["id"] for item in everything].index(f"w{w}-0") for w in range(16)]
    assert sorted(start % 5 for start in starts) == [0] * 16

    again = await store.add_conversation_items(cid, [{"id": "w0-0", "type": "message"}, {"id": "new", "type": "x"}])
    assert again[0]["id"] != "w0-0" and again[0]["id"].startswith("msg_") and again[1]["id"] == "new"
    newest, more = await store.conversation_items(cid, limit=2, descending=True)
    assert [item["id"] for item in newest] == ["new", again[0]["id"]] and more
    after, _ = await store.conversation_items(cid, after=newest[-1]["id"], limit=1, descending=True)
    assert after == everything[-1:]
    oldest, more = await store.conversation_items(cid, limit=1)
    assert oldest == everything[:1] and more
    second, _ = await store.conversation_items(cid, after=oldest[0]["id"], limit=1)
    assert second == everything[1:2]
    with pytest.raises(InvalidInput):
        await store.conversation_items(cid, after="nope")

    assert await store.delete_conversation_item(cid, "new") and not await store.delete_conversation_item(cid, "new")
    assert await store.find_conversation_item(cid, "w3-2") == {"id": "w3-2", "type": "message", "n": 2}
    assert await store.delete_conversation(cid)
    assert await store.find_conversation(cid) is None and await store.add_conversation_items(cid, [{"id": "z"}]) is None
    assert (await store.conversation_items(cid))[0] == [] and not await store.delete_conversation(cid)


async def test_ids_no_row_can_have_name_none(store):
    """An id with NUL (PostgreSQL text cannot hold one) or longer than its
    column is unknown, on both back-ends, not a failed query; an item given
    one gets a fresh id."""
    conversation, _ = await store.create_conversation(user=None, metadata={})
    cid = conversation.conversation_id
    for bad in ("a\x00b", "a" * 129, ""):
        assert await store.find_conversation(bad) is None
        assert await store.find_conversation_item(cid, bad) is None
        assert not await store.delete_conversation_item(cid, bad)
        assert await store.find_responses([bad]) == {}
    with pytest.raises(InvalidInput):
        await store.conversation_items(cid, after="a\x00b")
    (kept,) = await store.add_conversation_items(cid, [{"id": "a\x00b", "type": "message"}])
    assert kept["id"].startswith("msg_")
