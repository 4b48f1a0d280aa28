"""Anthropic's Message Batches API (/v1/messages/batches) through Anthropic's
own SDK over real HTTP in front of the worker loop on the tiny engine: a
batch's results are, request by request, what /v1/messages answers (a bad
request's error included, in Anthropic's shape); it is listed, paged,
cancelled (its unanswered requests `canceled`) and deleted with its files;
the envelope's errors are Anthropic-shaped 400s; another user's batch is a
404; the Batch API's own batches are not Message Batches."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai as openai_sdk
import pytest
from responses_helpers import MODEL, keyed_gateway, sdk

ASK = [{"role": "user", "content": "How do I sleep better?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with keyed_gateway(tmp_path_factory.mktemp("message-batches")) as url:
        yield url


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key="admin", max_retries=0)


def params(content: str = "How do I sleep better?", max_tokens: int = 6, **extra) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}], **extra}


def ended(claude: anthropic.Anthropic, batch_id: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while (batch := claude.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.processing_status}"
        time.sleep(0.2)
    return batch


def test_a_batchs_results_are_what_the_messages_api_answers(claude):
    created = claude.messages.batches.create(requests=[
        {"custom_id": "plain", "params": params()},
        {"custom_id": "pad", "params": params(preference="short answers")},
        {"custom_id": "bad", "params": {"model": MODEL, "max_tokens": 5, "messages": []}},
        {"custom_id": "stop", "params": params(max_tokens=20, stop_sequences=["e"])},
    ])
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status == "in_progress" and created.results_url is None
    assert created.request_counts.processing == 4 and created.ended_at is None
    batch = ended(claude, created.id)
    assert batch.request_counts.model_dump() == {"processing": 0, "succeeded": 3, "errored": 1, "canceled": 0,
                                                 "expired": 0}
    assert batch.ended_at is not None and batch.expires_at > batch.created_at
    assert batch.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")

    results = {line.custom_id: line.result for line in claude.messages.batches.results(batch.id)}
    assert list(results) == ["plain", "pad", "bad", "stop"]  # input order
    for custom_id in ("plain", "pad", "stop"):
        assert results[custom_id].type == "succeeded"
    alone = claude.messages.create(model=MODEL, max_tokens=6, messages=ASK, extra_body={"temperature": 0})
    assert results["plain"].message.content[0].text == alone.content[0].text
    assert results["plain"].message.usage.output_tokens == 6 and results["plain"].message.stop_reason == "max_tokens"
    pad = claude.messages.create(model=MODEL, max_tokens=6, messages=ASK,
                                 extra_body={"temperature": 0, "preference": "short answers"})
    assert results["pad"].message.content[0].text == pad.content[0].text
    assert results["stop"].message.stop_reason in ("stop_sequence", "max_tokens")
    refused = results["bad"]
    assert refused.type == "errored" and refused.error.type == "error"
    assert refused.error.error.type == "invalid_request_error" and "messages" in refused.error.error.message


def test_a_cancelled_batch_ends_with_its_unanswered_requests_canceled(claude):
    created = claude.messages.batches.create(requests=[
        {"custom_id": f"q{i}", "params": params("Tell me a story.", max_tokens=40)} for i in range(30)])
    cancelled = claude.messages.batches.cancel(created.id)
    assert cancelled.processing_status in ("canceling", "ended") and cancelled.cancel_initiated_at is not None
    batch = ended(claude, created.id)
    counts = batch.request_counts
    assert counts.canceled > 0 and counts.succeeded + counts.canceled == 30 and counts.errored == 0
    results = list(claude.messages.batches.results(batch.id))
    assert [line.custom_id for line in results] == [f"q{i}" for i in range(30)]
    assert sum(line.result.type == "canceled" for line in results) == counts.canceled
    assert claude.messages.batches.cancel(batch.id).processing_status == "ended"  # an ended one, as it is


def test_batches_are_listed_newest_first_and_paged_both_ways(claude):
    ids = [claude.messages.batches.create(requests=[{"custom_id": "one", "params": params(max_tokens=1)}]).id
           for _ in range(3)]
    page = claude.messages.batches.list(limit=2)
    assert [batch.id for batch in page.data] == ids[::-1][:2] and page.has_more
    assert page.first_id == ids[2] and page.last_id == ids[1]
    following = claude.messages.batches.list(limit=2, after_id=ids[1])
    assert following.data[0].id == ids[0]
    before = claude.messages.batches.list(limit=1, before_id=ids[0])
    assert [batch.id for batch in before.data] == [ids[1]] and before.has_more
    everything = [batch.id for batch in claude.messages.batches.list(limit=1)]  # the SDK pages on its own
    assert everything[:3] == ids[::-1] and len(everything) == len(set(everything))


def test_an_ended_batch_is_deleted_with_its_files_and_a_running_one_is_refused(claude, server):
    created = claude.messages.batches.create(requests=[
        {"custom_id": f"q{i}", "params": params("Tell me a story.", max_tokens=40)} for i in range(20)])
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.batches.delete(created.id)
    assert "cancel it first" in refused.value.body["error"]["message"]
    claude.messages.batches.cancel(created.id)
    batch = ended(claude, created.id)
    # its input and result files are its own: not in the Files API, where deleting one would lose its results
    assert not any(file.filename.startswith(batch.id) for file in sdk(server).files.list())
    assert len(list(claude.messages.batches.results(batch.id))) == 20
    deleted = claude.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        list(claude.messages.batches.results(batch.id))


def test_the_envelopes_errors_are_anthropic_400s(claude, server):
    cases = [
        ({"requests": []}, "requests"),
        ({"requests": [{"custom_id": "a b", "params": params()}]}, "custom_id"),
        ({"requests": [{"custom_id": "x" * 65, "params": params()}]}, "custom_id"),
        ({"requests": [{"custom_id": "a", "params": params()}, {"custom_id": "a", "params": params()}]}, "unique"),
        ({"requests": [{"custom_id": "a", "params": params(stream=True)}]}, "stream"),
        ({"requests": [{"custom_id": "a"}]}, "params"),
        ({"requests": [{"custom_id": "a", "params": params()}], "nope": 1}, "nope"),
    ]
    for body, named in cases:
        answer = httpx.post(f"{server}/v1/messages/batches", json=body, headers={"x-api-key": "admin"})
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert named in error["error"]["message"], (named, error)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve("msgbatch_nope")


def test_a_batch_is_its_users_and_the_batch_apis_batches_are_not_message_batches(server):
    alice = anthropic.Anthropic(base_url=server, api_key="ka", max_retries=0)
    bob = anthropic.Anthropic(base_url=server, api_key="kb", max_retries=0)
    mine = alice.messages.batches.create(requests=[{"custom_id": "a", "params": params(max_tokens=1)}])
    with pytest.raises(anthropic.NotFoundError):
        bob.messages.batches.retrieve(mine.id)
    assert mine.id in [batch.id for batch in alice.messages.batches.list()]
    assert mine.id not in [batch.id for batch in bob.messages.batches.list()]

    openai = sdk(server)
    lines = [{"custom_id": custom_id, "url": "/v1/messages", "method": "POST",
              "body": {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]}}
             for custom_id, max_tokens in (("a", 2), ("bad", 0))]
    uploaded = openai.files.create(file=("in.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode()),
                                   purpose="batch")
    plain = openai.batches.create(input_file_id=uploaded.id, endpoint="/v1/messages", completion_window="24h")
    claude = anthropic.Anthropic(base_url=server, api_key="admin", max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve(plain.id)
    assert plain.id not in [batch.id for batch in claude.messages.batches.list()]
    message_batch = claude.messages.batches.create(requests=[{"custom_id": "a", "params": params(max_tokens=1)}])
    with pytest.raises(openai_sdk.NotFoundError):  # and the other way round
        openai.batches.retrieve(message_batch.id)
    assert message_batch.id not in [batch.id for batch in openai.batches.list()]
    deadline = time.monotonic() + 60
    while (plain := openai.batches.retrieve(plain.id)).status != "completed":  # /v1/messages in the Batch API too
        assert time.monotonic() < deadline, plain.status
        time.sleep(0.2)
    [line] = openai.files.content(plain.output_file_id).text.splitlines()
    assert '"type": "message"' in line
    [refused] = [json.loads(line) for line in openai.files.content(plain.error_file_id).text.splitlines()]
    assert refused["custom_id"] == "bad" and refused["error"]["code"] == "invalid_request_error"  # Anthropic's type
    assert refused["response"]["body"]["type"] == "error"


def test_a_message_batch_takes_a_body_up_to_the_upload_limit_not_the_request_limit(claude):
    """Its requests come inline (a Batch API's come as an uploaded file):
    past PAD_MAX_REQUEST_BYTES (2 MiB), within PAD_MAX_FILE_BYTES."""
    padding = "x" * (1536 * 1024)
    created = claude.messages.batches.create(requests=[
        {"custom_id": f"big{i}", "params": {**params(max_tokens=1), "padding": padding}} for i in range(2)])
    batch = ended(claude, created.id)
    assert batch.request_counts.errored == 2  # `padding` is no field of /v1/messages: each refused as it runs
    [first, _] = list(claude.messages.batches.results(batch.id))
    assert "padding" in first.result.error.error.message
    from server.request_body import BodyLimitMiddleware

    limits = BodyLimitMiddleware(None, limit=1024, upload_limit=4096)
    assert limits.limit_of({"method": "POST", "path": "/v1/messages/batches"}) == 4096
    assert limits.limit_of({"method": "POST", "path": "/v1/messages"}) == 1024


def test_an_ended_batch_past_its_29_days_reads_archived_without_a_results_url(monkeypatch):
    """Anthropic keeps a batch's results 29 days after its creation; then the
    batch shows `archived_at` and no `results_url` (its results route is a
    404: its files expired)."""
    from starlette.requests import Request

    from server import batches
    from server.routes import message_batches
    from server.store.records import StoredBatch

    batch = {**batches.new_batch("file-x", "/v1/messages", None, id_prefix=message_batches.ID_PREFIX),
             "status": "completed"}
    batch["completed_at"] = batch["created_at"] + 60
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"",
                       "server": ("pad", 80), "scheme": "http", "root_path": ""})
    now = time.time()
    fresh = message_batches.message_batch(StoredBatch(batch["id"], None, batch, False), request)
    assert fresh["archived_at"] is None and fresh["results_url"].endswith("/results")
    monkeypatch.setattr(time, "time", lambda: now + message_batches.RESULTS_KEPT_S + 1)
    old = message_batches.message_batch(StoredBatch(batch["id"], None, batch, False), request)
    assert old["results_url"] is None and old["processing_status"] == "ended"
    archived = message_batches.rfc3339(batch["created_at"] + message_batches.RESULTS_KEPT_S)
    assert old["archived_at"] == archived
