"""Background responses (`background: true`), through the official openai SDK
over real HTTP in front of the worker loop on the tiny engine (slowed, so a
response is still running while it is polled or cancelled): queued at once,
then in progress, then the answer a synchronous request gives; cancel on
this gateway and through another one over the same database; a gateway that
stops, or dies (its lease runs out), leaves its responses failed, never in
progress forever; a running response can be neither continued nor joined
to by a second turn of its conversation; deleting one stops it. Bad
combinations are OpenAI-shaped 400s. (Streamed background responses:
tests/test_background_streams.py.)"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from responses_helpers import GREEDY, MODEL, error_of, sdk, wait_for
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings
from server.store import Store
from server.store.config import StoreConfig

LONG = {**GREEDY, "max_output_tokens": 400}  # ~8 s on the slowed tiny engine: still running when polled


@pytest.fixture(scope="module")
def worker():
    with worker_thread(step_delay=0.02) as (address, _worker):
        yield address


def settings_for(worker: str, data_dir, **extra) -> ServerSettings:
    return ServerSettings(worker_address=worker, data_dir=data_dir, **extra)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("background")


@pytest.fixture(scope="module")
def server(worker, data_dir):
    with uvicorn_server(create_app(settings_for(worker, data_dir, background_lease_s=0.9))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def test_a_background_response_is_queued_then_answered_as_a_synchronous_one(client):
    queued = client.responses.create(input="How do I sleep better?", background=True, **GREEDY)
    assert (queued.status, queued.background, queued.output, queued.usage) == ("queued", True, [], None)
    done = wait_for(client, queued.id, ("completed", "incomplete"))
    direct = client.responses.create(input="How do I sleep better?", **GREEDY)
    assert done.output_text == direct.output_text and done.usage.output_tokens == direct.usage.output_tokens
    assert done.status == direct.status and done.background is True and done.error is None
    # a finished background response continues as any kept one
    chained = client.responses.create(input="And then?", previous_response_id=done.id, **GREEDY)
    assert chained.status in ("completed", "incomplete")


def test_cancel_stops_it_and_is_idempotent(client):
    running = client.responses.create(input="Tell me a long story.", background=True, **LONG)
    wait_for(client, running.id, ("in_progress",))
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled" and cancelled.background is True
    assert client.responses.retrieve(running.id).status == "cancelled"
    assert client.responses.cancel(running.id).status == "cancelled"  # again: unchanged
    # no longer running: its conversation goes on (without the answer it never gave)
    chained = client.responses.create(input="Go on.", previous_response_id=running.id, **GREEDY)
    assert chained.status in ("completed", "incomplete")


def test_a_finished_or_synchronous_response_cannot_be_cancelled(client):
    done = client.responses.create(input="Hi", background=True, **GREEDY)
    wait_for(client, done.id, ("completed", "incomplete"))
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(done.id)
    assert "already" in error_of(refused)["message"]
    plain = client.responses.create(input="Hi", **GREEDY)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(plain.id)
    assert "background" in error_of(refused)["message"]


def test_a_running_response_cannot_be_continued_yet(client):
    running = client.responses.create(input="Tell me a long story.", background=True, **LONG)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(input="And?", previous_response_id=running.id, **GREEDY)
    assert error_of(refused)["code"] == "previous_response_in_progress"
    assert error_of(refused)["param"] == "previous_response_id"
    client.responses.cancel(running.id)


def test_a_background_turn_holds_its_conversation_until_it_is_done(client):
    conversation = client.conversations.create()
    running = client.responses.create(input="Tell me a long story.", background=True, conversation=conversation.id,
                                      **{**LONG, "max_output_tokens": 60})
    with pytest.raises(openai.BadRequestError) as locked:
        client.responses.create(input="Hello?", conversation=conversation.id, **GREEDY)
    assert error_of(locked)["code"] == "conversation_locked"
    done = wait_for(client, running.id, ("completed", "incomplete"))
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.type for item in items] == ["message", "message"] and items[1].id == done.output[0].id
    assert client.responses.create(input="Thanks!", conversation=conversation.id, **GREEDY).status


def test_delete_stops_a_running_response_for_good(client):
    running = client.responses.create(input="Tell me a long story.", background=True, **LONG)
    wait_for(client, running.id, ("in_progress",))
    client.responses.delete(running.id)
    time.sleep(0.5)  # its run has stopped: nothing brings it back
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(running.id)


@pytest.mark.parametrize(("extra", "param"), [
    ({"store": False}, "background"),
    ({"store": False, "stream": True}, "background"),
])
def test_bad_combinations_are_400s(server, extra, param):
    answer = httpx.post(f"{server}/v1/responses", json={"model": MODEL, "input": "Hi", "background": True, **extra})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_a_server_that_keeps_no_responses_refuses_background(worker, tmp_path):
    with uvicorn_server(create_app(settings_for(worker, tmp_path, responses_retention_days=0))) as url:
        with pytest.raises(openai.BadRequestError) as refused:
            sdk(url).responses.create(input="Hi", background=True, **GREEDY)
    assert error_of(refused)["param"] == "background" and "RETENTION_DAYS is 0" in error_of(refused)["message"]


def test_a_cancel_through_another_gateway_reaches_the_run(worker, tmp_path):
    settings = settings_for(worker, tmp_path, background_lease_s=0.9)
    with uvicorn_server(create_app(settings)) as first, uvicorn_server(create_app(settings)) as second:
        running = sdk(first).responses.create(input="Tell me a long story.", background=True, **LONG)
        wait_for(sdk(first), running.id, ("in_progress",))
        time.sleep(1.0)  # past a whole lease: renewed by its run, so the other gateway reads it in progress
        assert sdk(second).responses.retrieve(running.id).status == "in_progress"
        started = time.monotonic()
        cancelled = sdk(second).responses.cancel(running.id)
        assert cancelled.status == "cancelled" and time.monotonic() - started < 5.0  # the answer takes ~8 s
        assert sdk(first).responses.retrieve(running.id).status == "cancelled"


def test_a_gateway_that_stops_fails_its_running_responses(worker, tmp_path):
    settings = settings_for(worker, tmp_path)
    with uvicorn_server(create_app(settings)) as url:
        running = sdk(url).responses.create(input="Tell me a long story.", background=True, **LONG)
        wait_for(sdk(url), running.id, ("in_progress",))
    with uvicorn_server(create_app(settings)) as url:
        got = sdk(url).responses.retrieve(running.id)
    assert got.status == "failed" and got.error.code == "server_error" and "stopped" in got.error.message


def test_a_response_whose_gateway_died_reads_failed_once_its_lease_ran_out(worker, tmp_path):
    """A gateway killed mid-answer leaves the response in progress with a
    lease nobody renews: read failed once the lease has run out, not before."""
    response = {"id": "resp_" + "a" * 32, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "background": True, "error": None, "output": [], "model": MODEL}

    async def orphan(lease_s: float) -> None:
        async with await Store.open(StoreConfig.from_settings(settings_for(worker, tmp_path))) as store:
            await store.record_response(response, user=None, conversation=[], call_names={}, input_items=[])
            await store.begin_background(response["id"], "dead-gateway", lease_s)

    with uvicorn_server(create_app(settings_for(worker, tmp_path))) as url:
        asyncio.run(orphan(3.0))
        assert sdk(url).responses.retrieve(response["id"]).status == "in_progress"  # its lease still runs
        time.sleep(3.1)
        got = sdk(url).responses.retrieve(response["id"])
        assert got.status == "failed" and got.error.code == "server_error"
        assert sdk(url).responses.retrieve(response["id"]).status == "failed"  # stored so


def test_background_responses_wait_for_room_in_a_full_queue(worker, tmp_path):
    """A busy server (max_queue 1, taken by a long answer): background
    responses stay queued until there is room, then are answered; none
    fails with queue_full (they were accepted with a 200 already)."""
    with uvicorn_server(create_app(settings_for(worker, tmp_path, max_queue=1))) as url:
        client = sdk(url)
        busy = client.responses.create(input="How do I sleep better?", background=True,
                                       **{**GREEDY, "max_output_tokens": 60})
        wait_for(client, busy.id, ("in_progress",), 30)
        waiting = [client.responses.create(input="Hi", background=True, **GREEDY) for _ in range(3)]
        time.sleep(0.5)
        assert client.responses.retrieve(waiting[0].id).status == "queued"  # no room yet: still waiting
        done = [wait_for(client, r.id, ("completed", "incomplete", "failed"), 60) for r in [busy, *waiting]]
        assert [r.status for r in done] == ["incomplete"] * 4, [r.error for r in done]
