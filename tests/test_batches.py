"""OpenAI's Files and Batch APIs through the official SDK (`client.files`,
`client.batches`) over real HTTP in front of the worker loop on the tiny
engine: a batch's answers are the ones its requests get when sent alone, in
input order, the refused ones in the error file; a file that is no batch
fails it with its lines named; files round-trip byte for byte; keys bound
to users see only their own files and batches, and a batch's requests run
with its key's scope; cancel keeps the results so far; a batch whose
gateway stops or dies is resumed by another after its last stored result,
each request answered once, with its key's scope as configured there."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from responses_helpers import KEYS, MODEL, error_of, sdk
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.auth_scopes import KeyTable
from server.batches import new_batch
from server.settings import ServerSettings
from server.store import Store, schema
from server.store.config import StoreConfig
from server.store.records import StoredFile
from server.worker_client import free_local_address

QUESTIONS = ["How do I sleep better?", "What is a cat?", "Name a colour.", "Hi"]


@pytest.fixture(scope="module")
def worker():
    with worker_thread(step_delay=0.01) as (address, _worker):
        yield address


def settings_for(worker: str, data_dir, **extra) -> ServerSettings:
    return ServerSettings(worker_address=worker, data_dir=data_dir, api_keys=KEYS,
                          **{"background_lease_s": 0.9, **extra})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batches")


@pytest.fixture(scope="module")
def server(worker, data_dir):
    with uvicorn_server(create_app(settings_for(worker, data_dir, max_file_bytes=64 * 1024))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def chat_line(custom_id: str, question: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 6,
                     "temperature": 0, **body}}


def upload(client: openai.OpenAI, lines: list, purpose: str = "batch"):
    content = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=("requests.jsonl", content.encode()), purpose=purpose)


def wait_done(client: openai.OpenAI, batch_id: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"still {batch.status}"
        time.sleep(0.1)
    return batch


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [] if file_id is None else [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


ADMIN_KEY_ID = KeyTable.from_specs(KEYS).authenticate("admin").key_id  # as a batch's stored scope names it


def long_batch(client: openai.OpenAI):
    """A batch long enough to be caught running: 30 stories (q0..q29) of 40 tokens."""
    lines = [chat_line(f"q{i}", "Tell me a story.", max_tokens=40) for i in range(30)]
    return client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def hand_lease_to_another_gateway(settings: ServerSettings, batch_id: str) -> None:
    """Another gateway took the batch's lease (this one's had run out): its run learns it at its renewal."""

    async def take_over() -> None:
        async with await Store.open(StoreConfig.from_settings(settings)) as store, store._write() as conn:
            await conn.execute(schema.batches.update().where(schema.batches.c.batch_id == batch_id)
                               .values(token="another-gateway", expires_at_ms=int(time.time() * 1000) + 60_000))

    asyncio.run(take_over())


def test_a_batch_answers_as_its_requests_alone_in_order_with_the_refused_in_the_error_file(client):
    lines = [chat_line(f"q{i}", q, **({"preference": "short answers"} if i % 2 else {}))
             for i, q in enumerate(QUESTIONS)]
    lines.insert(2, chat_line("wrong-model", "Hi", model="nope"))
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert (batch.status, batch.endpoint, batch.metadata) == ("validating", "/v1/chat/completions", {"job": "nightly"})
    done = wait_done(client, batch.id)
    assert done.status == "completed" and done.completed_at and done.in_progress_at and done.finalizing_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 4, 1)
    answered = lines_of(client, done.output_file_id)
    assert [line["custom_id"] for line in answered] == ["q0", "q1", "q2", "q3"]
    for line, request in zip(answered, [lines[0], lines[1], lines[3], lines[4]], strict=True):
        alone = httpx.post(f"{client.base_url}chat/completions", json=request["body"],
                           headers={"Authorization": "Bearer admin"}).json()
        body = line["response"]["body"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert body["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"]
    assert answered[1]["response"]["body"]["pad"]["preferences"] == [{"text": "short answers", "weight": 1.0}]
    [refused] = lines_of(client, done.error_file_id)
    assert refused["custom_id"] == "wrong-model" and refused["response"]["status_code"] == 404
    assert refused["error"]["code"] == "model_not_found"
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]


@pytest.mark.parametrize(("endpoint", "body", "field"), [
    ("/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 4}, "choices"),
    ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "store": False}, "output"),
])
def test_the_other_endpoints(client, endpoint, body, field):
    lines = [{"custom_id": "a", "method": "POST", "url": endpoint, "body": body}]
    done = wait_done(client, client.batches.create(input_file_id=upload(client, lines).id, endpoint=endpoint,
                                                   completion_window="24h").id)
    [line] = lines_of(client, done.output_file_id)
    assert done.status == "completed" and line["response"]["status_code"] == 200 and line["response"]["body"][field]


def test_a_file_that_is_no_batch_fails_it_naming_its_lines(client):
    lines = [chat_line("ok", "Hi"), "not json", chat_line("ok", "again"),
             {**chat_line("other", "Hi"), "url": "/v1/completions"}, chat_line("streamed", "Hi", stream=True)]
    done = wait_done(client, client.batches.create(input_file_id=upload(client, lines).id,
                                                   endpoint="/v1/chat/completions", completion_window="24h").id)
    assert done.status == "failed" and done.failed_at and done.output_file_id is None
    assert [(e.line, e.code) for e in done.errors.data] == [(2, "invalid_request"), (3, "invalid_request"),
                                                           (4, "invalid_request"), (5, "invalid_request")]
    assert "not the batch's endpoint" in done.errors.data[2].message
    empty = client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
    done = wait_done(client, client.batches.create(input_file_id=empty.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h").id)
    assert done.status == "failed" and done.errors.data[0].code == "empty_file"


def test_a_file_of_many_bad_lines_is_refused_quickly_naming_the_first_hundred(client):
    started = time.monotonic()
    bad = client.files.create(file=("bad.jsonl", b"x\n" * 20_000), purpose="batch")  # 40 kB, under the test limit
    done = wait_done(client, client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h").id)
    assert done.status == "failed" and len(done.errors.data) == 100 and done.errors.data[-1].line == 100
    assert time.monotonic() - started < 10


def test_a_key_bound_to_several_users_runs_a_batch_as_the_user_it_names(worker, tmp_path):
    settings = ServerSettings(worker_address=worker, data_dir=tmp_path, api_keys=["kab:alice,bob"])
    with uvicorn_server(create_app(settings)) as url:
        both = sdk(url, "kab")
        lines = [chat_line("as-alice", "Hi"), chat_line("as-bob", "Hi", user="bob")]
        made = httpx.post(f"{url}/v1/files", files={"file": ("r.jsonl", "".join(json.dumps(line) + "\n"
                                                                                   for line in lines).encode())},
                          data={"purpose": "batch", "user": "alice"}, headers={"Authorization": "Bearer kab"}).json()
        assert made["purpose"] == "batch"
        with pytest.raises(openai.PermissionDeniedError):  # which user's? it must say
            both.batches.create(input_file_id=made["id"], endpoint="/v1/chat/completions", completion_window="24h")
        batch = both.batches.create(input_file_id=made["id"], endpoint="/v1/chat/completions",
                                    completion_window="24h", extra_body={"user": "alice"})
        done = wait_done(both, batch.id)
        assert [line["custom_id"] for line in lines_of(both, done.output_file_id)] == ["as-alice"]
        assert [line["response"]["status_code"] for line in lines_of(both, done.error_file_id)] == [403]


def test_files_round_trip_list_and_delete(client, server):
    content = bytes(range(256)) * 3  # not text: kept as sent
    older = client.files.create(file=("older.bin", b"older"), purpose="user_data")
    made = client.files.create(file=("data.bin", content), purpose="user_data")
    assert (made.bytes, made.filename, made.purpose, made.object) == (768, "data.bin", "user_data", "file")
    assert client.files.content(made.id).content == content
    assert client.files.retrieve(made.id).id == made.id
    batch_files = client.files.list(purpose="batch").data
    assert made.id not in [f.id for f in batch_files] and all(f.purpose == "batch" for f in batch_files)
    newest = client.files.list(limit=1)
    assert newest.data[0].id == made.id and newest.has_more
    after = client.files.list(limit=100, after=made.id, order="desc").data
    assert after[0].id == older.id  # in the order they came, within a second too
    assert client.files.list(limit=100, order="asc").data[-1].id == made.id
    assert client.files.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError) as gone:
        client.files.retrieve(made.id)
    assert error_of(gone)["code"] == "file_not_found"


@pytest.mark.parametrize(("make", "status", "param"), [
    (lambda url: httpx.post(f"{url}/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fun"},
                            headers={"Authorization": "Bearer admin"}), 400, "purpose"),
    (lambda url: httpx.post(f"{url}/v1/files", data={"purpose": "batch"}, headers={"Authorization": "Bearer admin"}),
     400, "file"),
    (lambda url: httpx.post(f"{url}/v1/files", json={"purpose": "batch"}, headers={"Authorization": "Bearer admin"}),
     400, "file"),
    (lambda url: httpx.post(f"{url}/v1/files", files={"file": ("a.jsonl", b"x" * 70 * 1024)},
                            data={"purpose": "batch"}, headers={"Authorization": "Bearer admin"}), 413, None),
    (lambda url: httpx.post(f"{url}/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "batch"}),
     401, None),
    (lambda url: httpx.post(f"{url}/v1/batches", json={"input_file_id": "file-nope", "endpoint":
                            "/v1/chat/completions", "completion_window": "24h"},
                            headers={"Authorization": "Bearer admin"}), 404, "input_file_id"),
    (lambda url: httpx.post(f"{url}/v1/batches", json={"input_file_id": "f", "endpoint": "/v1/embeddings",
                            "completion_window": "24h"}, headers={"Authorization": "Bearer admin"}), 400, "endpoint"),
    (lambda url: httpx.post(f"{url}/v1/batches", json={"input_file_id": "f", "endpoint": "/v1/completions",
                            "completion_window": "1h"}, headers={"Authorization": "Bearer admin"}),
     400, "completion_window"),
    (lambda url: httpx.get(f"{url}/v1/batches/batch_nope", headers={"Authorization": "Bearer admin"}), 404,
     "batch_id"),
    (lambda url: httpx.get(f"{url}/v1/batches", params={"limit": 0}, headers={"Authorization": "Bearer admin"}),
     400, "limit"),
    (lambda url: httpx.get(f"{url}/v1/files", params={"after": "file-nope"}, headers={"Authorization": "Bearer admin"}),
     400, "after"),
])
def test_bad_input_is_an_openai_shaped_4xx(server, make, status, param):
    answer = make(server)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_files_expire_as_openais_and_an_expired_file_is_gone_at_once(client, data_dir):
    hour = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 3600})
    assert hour.expires_at - hour.created_at == 3600
    default = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    assert default.expires_at - default.created_at == 30 * 86400  # OpenAI's default for batch files
    assert client.files.create(file=("a.txt", b"x"), purpose="user_data").expires_at is None  # kept until deleted
    for bad in ({"anchor": "created_at", "seconds": 3599}, {"anchor": "created_at", "seconds": 2592001},
                {"anchor": "last_active_at", "seconds": 3600}, {"anchor": "created_at"},
                {"anchor": "created_at", "seconds": "1e4"}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch", expires_after=bad)
        assert refused.value.body["param"] == "expires_after"

    async def expire(file_id: str) -> None:
        async with await Store.open(StoreConfig.from_settings(settings_for("tcp://unused", data_dir))
                                    ) as store, store._write() as conn:
            await conn.execute(schema.files.update().where(schema.files.c.file_id == file_id)
                               .values(expires_at=int(time.time()) - 1))

    asyncio.run(expire(hour.id))
    for read in (client.files.retrieve, client.files.content):
        with pytest.raises(openai.NotFoundError):
            read(hour.id)
    assert hour.id not in [f.id for f in client.files.list(purpose="batch").data]
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id=hour.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_batchs_result_files_expire_as_its_output_expires_after_says(client):
    batch = client.batches.create(input_file_id=upload(client, [chat_line("a", "Hi"), chat_line("b", "Hi",
                                                                                                  model="nope")]).id,
                                  endpoint="/v1/chat/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 7200})
    done = wait_done(client, batch.id)
    for file_id in (done.output_file_id, done.error_file_id):
        made = client.files.retrieve(file_id)
        assert made.expires_at - made.created_at == 7200
    kept = wait_done(client, client.batches.create(input_file_id=upload(client, [chat_line("a", "Hi")]).id,
                                                   endpoint="/v1/chat/completions", completion_window="24h").id)
    assert client.files.retrieve(kept.output_file_id).expires_at is None
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=upload(client, [chat_line("a", "Hi")]).id,
                              endpoint="/v1/chat/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 60})
    assert refused.value.body["param"].startswith("output_expires_after")


def test_a_chat_body_keeps_its_own_smaller_limit(server):
    huge = "x" * (3 * 1024 * 1024)  # past PAD_MAX_REQUEST_BYTES (2 MiB) though under no file limit here
    answer = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": huge}]},
                        headers={"Authorization": "Bearer admin"})
    assert answer.status_code == 413 and "PAD_MAX_REQUEST_BYTES" in answer.json()["error"]["message"]


def test_a_purpose_that_is_not_batch_and_another_users_files_and_batches(server):
    alice, bob = sdk(server, "ka"), sdk(server, "kb")
    data = upload(alice, [chat_line("a", "Hi")], purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        alice.batches.create(input_file_id=data.id, endpoint="/v1/chat/completions", completion_window="24h")
    mine = upload(alice, [chat_line("mine", "Hi"), chat_line("as-bob", "Hi", user="bob")])
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert mine.id not in [f.id for f in bob.files.list().data]
    done = wait_done(alice, alice.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                                                 completion_window="24h").id)
    # its requests ran with alice's key: as alice, not as bob
    assert [line["custom_id"] for line in lines_of(alice, done.output_file_id)] == ["mine"]
    [refused] = lines_of(alice, done.error_file_id)
    assert refused["custom_id"] == "as-bob" and refused["response"]["status_code"] == 403
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(done.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(done.output_file_id)
    assert done.id not in [b.id for b in bob.batches.list().data]


def test_cancel_keeps_the_results_so_far(worker, tmp_path):
    settings = settings_for(worker, tmp_path, batch_concurrency=1)
    with uvicorn_server(create_app(settings)) as url:
        client = sdk(url)
        batch = long_batch(client)
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cancelled = client.batches.cancel(batch.id)
        assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.cancelling_at
        kept = lines_of(client, cancelled.output_file_id)
        assert 2 <= len(kept) == cancelled.request_counts.completed < 30
        assert [line["custom_id"] for line in kept] == [f"q{i}" for i in range(len(kept))]
        assert client.batches.cancel(batch.id).status == "cancelled"  # again: as it is
        finished = wait_done(client, client.batches.create(
            input_file_id=upload(client, [chat_line("x", "Hi")]).id, endpoint="/v1/chat/completions",
            completion_window="24h").id)
        with pytest.raises(openai.BadRequestError):
            client.batches.cancel(finished.id)


def test_a_cancel_through_another_gateway_reaches_the_run(worker, tmp_path):
    settings = settings_for(worker, tmp_path, batch_concurrency=1)
    with uvicorn_server(create_app(settings)) as first, uvicorn_server(create_app(settings)) as second:
        batch = long_batch(sdk(first))
        while sdk(second).batches.retrieve(batch.id).status != "in_progress":
            time.sleep(0.05)
        cancelled = sdk(second).batches.cancel(batch.id)
        assert cancelled.status in ("cancelling", "cancelled")
        assert wait_done(sdk(second), batch.id, 10).status == "cancelled"


def test_a_gateway_that_stops_leaves_its_batches_to_the_next_which_finishes_them(worker, tmp_path):
    settings = settings_for(worker, tmp_path, batch_concurrency=1)
    with uvicorn_server(create_app(settings)) as url:
        batch = long_batch(sdk(url))
        while sdk(url).batches.retrieve(batch.id).request_counts.completed < 3:
            time.sleep(0.05)
    with uvicorn_server(create_app(settings)) as url:
        stopped = sdk(url).batches.retrieve(batch.id)
        assert stopped.status == "in_progress" and stopped.request_counts.completed >= 3
        done = wait_done(sdk(url), batch.id)
        assert done.status == "completed" and done.errors is None
        assert (done.request_counts.completed, done.request_counts.failed) == (30, 0)
        answered = lines_of(sdk(url), done.output_file_id)
        assert [line["custom_id"] for line in answered] == [f"q{i}" for i in range(30)]  # each once, in order
        assert len({line["response"]["body"]["choices"][0]["message"]["content"] for line in answered}) == 1


def test_a_batch_waits_for_a_worker_that_is_not_ready_and_is_resumed_only_by_a_gateway_with_one(tmp_path):
    address = free_local_address()
    settings = settings_for(address, tmp_path)
    lines = [chat_line(f"q{i}", "Hi") for i in range(3)]
    with uvicorn_server(create_app(settings), healthy=False) as url:  # its worker not started yet
        batch = sdk(url).batches.create(input_file_id=upload(sdk(url), lines).id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        orphaned = orphan(settings, lines, answered=1, key_id=ADMIN_KEY_ID)
        time.sleep(1.5)
        waiting = sdk(url).batches.retrieve(batch.id)
        assert waiting.status == "in_progress" and waiting.request_counts.completed == 0  # not failed meanwhile
        assert sdk(url).batches.retrieve(orphaned).status == "in_progress"  # left for a gateway that can answer
        with worker_thread(address):
            assert wait_done(sdk(url), batch.id, 60).request_counts.completed == 3
            done = wait_done(sdk(url), orphaned, 60)
            assert (done.status, done.request_counts.completed) == ("completed", 3)


def stored_result(custom_id: str, content: str) -> dict:
    """A result as a gateway that died had stored it (a marker answer no model would give)."""
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "request_id": "old", "body": {"choices": [{"message": {
                "role": "assistant", "content": content}}]}}}


def orphan(settings: ServerSettings, lines: list, *, answered: int, key_id: str | None, users=None,
           cancel: bool = False, scoped: bool = True) -> str:
    """A batch as a gateway that died left it: in progress, its first
    `answered` results stored, its lease (1 s) running out."""
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()

    async def leave() -> str:
        async with await Store.open(StoreConfig.from_settings(settings)) as store:
            upload = StoredFile("file-orphan-input-" + str(time.monotonic_ns()), None, "batch", "in.jsonl",
                                len(content), int(time.time()))
            await store.record_file(upload, content)
            batch = {**new_batch(upload.file_id, "/v1/chat/completions", None), "status": "in_progress"}
            await store.create_batch(batch, user=None, token="dead-gateway", lease_s=1.0, key_id=key_id, users=users)
            results = [(n + 1, True, json.dumps(stored_result(lines[n]["custom_id"], f"stored {n + 1}")))
                       for n in range(answered)]
            assert await store.update_batch(batch, "dead-gateway", results)
            if cancel:
                assert await store.request_batch_cancel(batch["id"])
            if not scoped:  # as a batch of schema v7 was
                async with store._write() as conn:
                    await conn.execute(schema.batch_runs.delete())
            return batch["id"]

    return asyncio.run(leave())


def test_a_batch_whose_gateway_died_is_resumed_once_after_its_last_stored_result(worker, tmp_path):
    settings = settings_for(worker, tmp_path)
    lines = [chat_line(f"q{i}", QUESTIONS[i % 4]) for i in range(8)]
    with uvicorn_server(create_app(settings)) as first, uvicorn_server(create_app(settings)) as second:
        batch_id = orphan(settings, lines, answered=3, key_id=ADMIN_KEY_ID)
        assert sdk(first).batches.retrieve(batch_id).status == "in_progress"  # not failed: it will go on
        done = wait_done(sdk(second), batch_id, 60)
        assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (8, 0)
        answered = lines_of(sdk(first), done.output_file_id)
        assert [line["custom_id"] for line in answered] == [f"q{i}" for i in range(8)]  # each once: one gateway won
        contents = [line["response"]["body"]["choices"][0]["message"]["content"] for line in answered]
        assert contents[:3] == ["stored 1", "stored 2", "stored 3"]  # kept, not asked again
        alone = sdk(first).chat.completions.create(**lines[3]["body"]).choices[0].message.content
        assert contents[3] == alone and contents[4:] == [c for c in contents[4:] if not c.startswith("stored")]


def test_a_cancel_of_an_orphaned_batch_ends_it_with_its_stored_results(worker, tmp_path):
    # This gateway looks for orphans every 10 s (a third of its lease), so the cancel, not a scan, finds it
    # (with a 0.9 s lease a scan could resume it, and finish it, before the cancel arrived).
    settings = settings_for(worker, tmp_path, background_lease_s=30)
    lines = [chat_line(f"q{i}", "Hi") for i in range(5)]
    with uvicorn_server(create_app(settings)) as url:
        batch_id = orphan(settings, lines, answered=2, key_id=ADMIN_KEY_ID)
        time.sleep(1.1)  # its lease runs out
        cancelled = sdk(url).batches.cancel(batch_id)
        assert cancelled.status == "cancelled" and cancelled.request_counts.completed == 2
        assert [line["custom_id"] for line in lines_of(sdk(url), cancelled.output_file_id)] == ["q0", "q1"]
        asked_before = orphan(settings, lines, answered=1, key_id=None, cancel=True)  # asked while it still ran
        assert wait_done(sdk(url), asked_before, 30).status == "cancelled"


@pytest.mark.parametrize(("key_id", "scoped", "why"), [
    ("key-000000000000", True, "no longer accepted"),  # a key since removed
    (None, True, "without an API key"),  # made on a server without keys
    ("admin", False, "older than this one"),  # stopped by a server of schema v7
])
def test_a_batch_that_cannot_be_resumed_fails_keeping_its_stored_results(worker, tmp_path, key_id, scoped, why):
    settings = settings_for(worker, tmp_path)
    if key_id == "admin":
        key_id = ADMIN_KEY_ID
    with uvicorn_server(create_app(settings)) as url:
        batch_id = orphan(settings, [chat_line(f"q{i}", "Hi") for i in range(4)], answered=2, key_id=key_id,
                          scoped=scoped)
        done = wait_done(sdk(url), batch_id, 30)
        assert done.status == "failed" and done.errors.data[0].code == "cannot_resume"
        assert why in done.errors.data[0].message
        assert len(lines_of(sdk(url), done.output_file_id)) == 2


def test_a_resumed_batch_runs_with_its_key_as_configured_now_for_its_user(worker, tmp_path):
    settings = settings_for(worker, tmp_path)
    alice_key = KeyTable.from_specs(KEYS).authenticate("ka").key_id
    lines = [chat_line("mine", "Hi", user="alice"), chat_line("bobs", "Hi", user="bob")]
    with uvicorn_server(create_app(settings)) as url:
        batch_id = orphan(settings, lines, answered=0, key_id=alice_key, users=frozenset({"alice"}))
        done = wait_done(sdk(url), batch_id, 30)
        assert [line["custom_id"] for line in lines_of(sdk(url), done.output_file_id)] == ["mine"]
        assert [line["response"]["status_code"] for line in lines_of(sdk(url), done.error_file_id)] == [403]


def test_a_run_whose_lease_another_gateway_took_stops_without_writing(worker, tmp_path):
    settings = settings_for(worker, tmp_path, batch_concurrency=1)
    with uvicorn_server(create_app(settings)) as url:
        batch = long_batch(sdk(url))
        while sdk(url).batches.retrieve(batch.id).request_counts.completed < 1:
            time.sleep(0.05)
        hand_lease_to_another_gateway(settings, batch.id)
        time.sleep(1.0)  # the run learns it at its next renewal (every 0.3 s) and stops
        seen = sdk(url).batches.retrieve(batch.id)
        time.sleep(1.5)
        again = sdk(url).batches.retrieve(batch.id)
        assert seen.status == again.status == "in_progress" and seen.request_counts == again.request_counts
        assert seen.output_file_id is None


def test_a_cancel_on_a_gateway_whose_run_lost_its_lease_reaches_the_new_runner(worker, tmp_path):
    settings = ServerSettings(worker_address=worker, data_dir=tmp_path, api_keys=KEYS, background_lease_s=6,
                              batch_concurrency=1)
    with uvicorn_server(create_app(settings)) as url:
        batch = long_batch(sdk(url))
        while sdk(url).batches.retrieve(batch.id).status != "in_progress":
            time.sleep(0.05)
        hand_lease_to_another_gateway(settings, batch.id)
        asked = sdk(url).batches.cancel(batch.id)  # this gateway still runs it (renewal every 2 s)
        assert asked.status == "cancelling" and asked.cancelling_at  # the ask is in the store, for the new runner


def test_a_batch_on_a_busy_server_waits_its_turn_and_leaves_clients_room(worker, tmp_path):
    """max_queue 2: the batch keeps to half the queue (one request in flight),
    so interactive clients still get in, and its requests that meet a full
    queue (429) wait and are retried until answered: no line fails."""
    import concurrent.futures

    settings = settings_for(worker, tmp_path, max_queue=2, batch_concurrency=16)
    with uvicorn_server(create_app(settings)) as url:
        client = sdk(url)
        batch = client.batches.create(input_file_id=upload(client, [chat_line(f"q{i}", "Hi", max_tokens=20)
                                                                    for i in range(8)]).id,
                                      endpoint="/v1/chat/completions", completion_window="24h")

        def interactive(_) -> tuple[int, bool]:
            """(status, whether the batch was still running): retried on a 429, as the SDKs do."""
            for _ in range(50):
                status = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer admin"},
                                    timeout=60, json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 20}).status_code
                if status != 429:
                    break
                time.sleep(0.1)
            return status, client.batches.retrieve(batch.id).status == "in_progress"

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answered = list(pool.map(interactive, range(6)))
        done = wait_done(client, batch.id, 120)
        assert done.status == "completed" and done.request_counts.completed == 8 and done.request_counts.failed == 0
        assert all(status == 200 for status, _ in answered)
        assert any(running for _, running in answered)  # clients were answered while the batch ran
