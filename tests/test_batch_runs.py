"""The Batch API's runs (server/batches.py) on an ASGI stand-in for the
app, over a real store: a batch stopped with its gateway is resumed by the
next one with every line answered once and in order (SQLite and
PostgreSQL); a cancel however early ends a run; a resumed run keeps its
counts and its scope, never a wider one; a resumed batch with every line
answered completes even past its window."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from store_helpers import db_url, store_config  # noqa: F401  (fixture)

from server.auth_scopes import KeyScope, KeyTable
from server.batches import BatchRuns, new_batch, resumed_scope
from server.store import Store
from server.store.records import ClaimedBatch, StoredBatch, StoredFile


class EchoApp:
    """Answers every chat request 200 with its first message's text, after
    3 s for "slow" (else 10 ms); records what it was sent."""

    def __init__(self, keys=()):
        self.state = SimpleNamespace(worker=SimpleNamespace(ready=True), key_table=KeyTable.from_specs(list(keys)))
        self.sent: list[str] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        content = json.loads(body)["messages"][0]["content"]
        self.sent.append(content)
        await asyncio.sleep(3.0 if content == "slow" else 0.01)
        answer = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


def settings(lease_s: float = 3.0, concurrency: int = 4):
    return SimpleNamespace(background_lease_s=lease_s, batch_concurrency=concurrency, max_queue=256)


async def input_file(store: Store, contents: list[str]) -> str:
    data = "".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "m", "messages": [{"role": "user", "content": content}]}}) + "\n"
                   for i, content in enumerate(contents)).encode()
    file = StoredFile(f"file-{time.monotonic_ns()}", None, "batch", "in.jsonl", len(data), int(time.time()))
    await store.record_file(file, data)
    return file.file_id


async def ended(store: Store, batch_id: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (batch := (await store.find_batch(batch_id)).batch)["status"] not in ("completed", "cancelled", "failed",
                                                                                "expired"):
        assert time.monotonic() < deadline, batch["status"]
        await asyncio.sleep(0.05)
    return batch


async def custom_ids(store: Store, file_id: str) -> list[str]:
    return [json.loads(line)["custom_id"] for line in (await store.file_content(file_id)).decode().splitlines()]


async def orphan(store: Store, contents: list[str], answered: int, **batch) -> dict:
    """A batch as a gateway that died left it: its first `answered` results stored, its lease run out."""
    batch = {**new_batch(await input_file(store, contents), "/v1/chat/completions", None), "status": "in_progress",
             **batch, "request_counts": {"total": len(contents), "completed": answered, "failed": 0}}
    await store.create_batch(batch, user=None, token="dead", lease_s=0.05, key_id=None, users=None)
    results = [(n, True, json.dumps({"custom_id": f"q{n - 1}", "error": None})) for n in range(1, answered + 1)]
    assert await store.update_batch(batch, "dead", results)
    await asyncio.sleep(0.1)
    return batch


async def test_a_batch_stopped_with_its_gateway_is_finished_by_the_next_each_line_once(db_url):  # noqa: F811
    store = await Store.open(store_config(db_url))
    contents = [f"fast{i}" for i in range(300)]
    contents[60] = "slow"  # the lines before it answered and stored, those after it held back behind it
    runs, first = BatchRuns(EchoApp(), store, settings(concurrency=2)), None
    try:
        batch = new_batch(await input_file(store, contents), "/v1/chat/completions", None)
        await runs.start(batch, None, None)
        await asyncio.sleep(2.0)  # the slow line in flight, the lines after it answered and waiting behind it
        first = runs._app.sent
        await runs.close()  # the gateway stops: what it stored stays, its lease is given up
        assert (await store.find_batch(batch["id"])).batch["status"] == "in_progress"
        stored_through = (await store.batch_progress(batch["id"]))[0]
        assert 0 < stored_through <= 60  # a stored prefix, up to the slow line
    finally:
        await store.close()
    store = await Store.open(store_config(db_url))
    runs = BatchRuns(EchoApp(), store, settings(concurrency=2))
    runs.start_looking()
    try:
        done = await ended(store, batch["id"])
        assert done["status"] == "completed" and done["request_counts"] == {"total": 300, "completed": 300,
                                                                           "failed": 0}
        assert await custom_ids(store, done["output_file_id"]) == [f"q{i}" for i in range(300)]
        assert runs._app.sent == contents[stored_through:]  # only the lines not stored were sent again
        assert first[:stored_through] == contents[:stored_through]  # the stored ones had been sent, in order
    finally:
        await runs.close()
        await store.close()


@pytest.fixture
async def sqlite_runs(tmp_path):
    """Makes (store, BatchRuns on an EchoApp) over a fresh SQLite store; closes them after the test."""
    made = []

    async def make(lease_s: float = 3.0) -> tuple[Store, BatchRuns]:
        store = await Store.open(store_config(f"sqlite:///{tmp_path / 'pad.db'}"))
        made.append((store, BatchRuns(EchoApp(), store, settings(lease_s=lease_s))))
        return made[-1]

    yield make
    for store, runs in made:
        await runs.close()
        await store.close()


async def test_a_cancel_before_the_run_has_started_ends_it(sqlite_runs):
    store, runs = await sqlite_runs(lease_s=0.6)
    batch = new_batch(await input_file(store, ["a", "b"]), "/v1/chat/completions", None)
    await runs.start(batch, None, None)
    async with asyncio.timeout(5):  # no step of the run's task between its start and the cancel
        assert await runs.cancel(batch["id"])
    assert (await store.find_batch(batch["id"])).batch["status"] == "cancelled"
    assert not runs.runs_here(batch["id"]) and runs._app.sent == []


async def test_a_resumed_run_cancelled_at_once_keeps_its_stored_counts(sqlite_runs):
    store, runs = await sqlite_runs()
    batch = await orphan(store, ["a", "b", "c"], answered=2)
    await runs._resume_orphans()
    await asyncio.sleep(0)  # the resumed run starts reading its progress
    assert await runs.cancel(batch["id"])
    done = await ended(store, batch["id"])
    assert done["status"] == "cancelled"
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 0}
    assert await custom_ids(store, done["output_file_id"]) == ["q0", "q1"]


async def test_a_resumed_batch_with_every_line_answered_completes_past_its_window(sqlite_runs):
    store, runs = await sqlite_runs()
    late = await orphan(store, ["a", "b"], answered=2, expires_at=int(time.time()) - 1)
    unfinished = await orphan(store, ["a", "b"], answered=1, expires_at=int(time.time()) - 1)
    await runs._resume_orphans()
    assert (await ended(store, late["id"]))["status"] == "completed"
    expired = await ended(store, unfinished["id"])
    assert expired["status"] == "expired" and await custom_ids(store, expired["output_file_id"]) == ["q0"]


KEYS = ["admin", "kab:alice,bob"]


def key_id(token: str) -> str:
    return KeyTable.from_specs(KEYS).authenticate(token).key_id


@pytest.mark.parametrize(("created", "keys_now", "resumed"), [
    (("kab", frozenset({"alice"})), KEYS, frozenset({"alice"})),  # the same key: the scope it ran with
    (("kab", frozenset({"alice"})), ["admin", "kab"], frozenset({"alice"})),  # now unbound: never wider
    (("kab", frozenset({"alice"})), ["admin", "kab:alice"], frozenset({"alice"})),  # still grants alice
    (("kab", frozenset({"alice"})), ["admin", "kab:bob"], "no longer act"),
    (("admin", None), ["admin"], None),
    (("admin", None), ["admin:bob"], "no longer act"),  # an unbound creator's batch never runs as bob
    (("admin", None), ["kab:alice,bob"], "no longer accepted"),
    ((None, None), ["admin"], "without an API key"),
    ((None, None), [], None),
    (("admin", None), [], None),  # no keys now: every user, as every request there
])
def test_a_resumed_batch_runs_with_the_scope_it_had_or_none(created, keys_now, resumed):
    creator, users = created
    claimed = ClaimedBatch(StoredBatch("batch_x", "alice", {}, True), False, True,
                           None if creator is None else key_id(creator), users, None)
    if isinstance(resumed, str):
        with pytest.raises(ValueError, match=resumed):
            resumed_scope(claimed, KeyTable.from_specs(keys_now))
    else:
        scope = resumed_scope(claimed, KeyTable.from_specs(keys_now))
        assert scope == (None if not keys_now else KeyScope(key_id(creator), resumed))
