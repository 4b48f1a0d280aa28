"""Streamed background responses (`background: true, stream: true`) and
reading their streams again (GET /v1/responses/{id}?stream=true&
starting_after=N), through the official openai SDK and raw HTTP in front of
the worker loop on the tiny engine (slowed, so a response still runs while
its stream is read again): the stream opens queued, a client that hangs up
leaves the run going, the rest of the stream is read again after any event,
on this gateway or on another over the same database, while it runs or
after; cancel ends it, and a dead gateway's stream ends failed. The event
log's own rules are tested on a store double at the end."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from responses_helpers import GREEDY, MODEL, error_of, sdk, wait_for
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.background_events import PAGE, EventLog, frame_of, kind_of, replay
from server.settings import ServerSettings
from server.store import Store
from server.store.config import StoreConfig
from server.store.records import ResponseEvent

RUNNING = {**GREEDY, "max_output_tokens": 150}  # ~3 s on the slowed tiny engine
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


@pytest.fixture(scope="module")
def worker():
    with worker_thread(step_delay=0.02) as (address, _worker):
        yield address


def settings_for(worker: str, data_dir, **extra) -> ServerSettings:
    return ServerSettings(worker_address=worker, data_dir=data_dir, background_lease_s=0.9, **extra)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("background-streams")


@pytest.fixture(scope="module")
def server(worker, data_dir):
    with uvicorn_server(create_app(settings_for(worker, data_dir))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def events_of(response: httpx.Response) -> Iterator[dict]:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            assert event["type"] == kind
            yield event


def post_stream(server: str, take: int | None = None, **body) -> list[dict]:
    """The events of a streamed background request; the first `take` only
    (then the client hangs up) when given."""
    payload = {"input": "Tell me a long story.", **RUNNING, "background": True, "stream": True, **body}
    events = []
    with httpx.stream("POST", f"{server}/v1/responses", json=payload, timeout=60) as response:
        for event in events_of(response):
            events.append(event)
            if take is not None and len(events) == take:
                break
    return events


def read_again(server: str, response_id: str, after: int | None = None) -> list[dict]:
    params = {"stream": "true"} | ({} if after is None else {"starting_after": str(after)})
    with httpx.stream("GET", f"{server}/v1/responses/{response_id}", params=params, timeout=60) as response:
        return list(events_of(response))


def test_the_stream_opens_queued_and_ends_as_a_synchronous_answer(client):
    stream = client.responses.create(input="How do I sleep better?", background=True, stream=True, **GREEDY)
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"], kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "queued" and events[0].response.background is True
    assert kinds[-1] in TERMINAL[:2] and "response.output_text.delta" in kinds
    streamed = events[-1].response
    direct = client.responses.create(input="How do I sleep better?", **GREEDY)
    assert streamed.output_text == direct.output_text and streamed.status == direct.status
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == direct.output_text
    kept = client.responses.retrieve(streamed.id)
    assert kept.status == streamed.status and kept.output_text == streamed.output_text and kept.background


def test_it_is_read_again_whole_or_after_any_event(client, server):
    events = post_stream(server, max_output_tokens=12)
    response_id = events[0]["response"]["id"]
    assert events[-1]["type"] in TERMINAL
    assert read_again(server, response_id) == events
    for after in (-1, 0, 2, len(events) // 2, len(events) - 2, len(events) - 1, len(events) + 5, 2**40):
        assert read_again(server, response_id, after) == events[after + 1:], after
    # the SDK's reader: retrieve(stream=True), and stream(response_id=, starting_after=), which reads
    # the whole stream and skips the events up to starting_after itself
    again = list(client.responses.retrieve(response_id, stream=True, starting_after=3))
    assert [e.to_dict() for e in again] == events[4:]
    with client.responses.stream(response_id=response_id, starting_after=3) as stream:
        assert [e.sequence_number for e in stream] == list(range(4, len(events)))


def test_a_client_that_hangs_up_leaves_the_run_going_and_reads_the_rest(client, server):
    first = post_stream(server, take=6)
    response_id = first[0]["response"]["id"]
    rest = read_again(server, response_id, first[-1]["sequence_number"])  # while it runs: followed live
    assert rest[0]["sequence_number"] == 6 and rest[-1]["type"] in TERMINAL
    assert rest[-1]["response"]["usage"]["output_tokens"] == 150  # the whole answer, not cut by the hang-up
    assert read_again(server, response_id) == first + rest
    assert client.responses.retrieve(response_id).status == rest[-1]["response"]["status"]


def test_another_gateway_follows_the_stream_from_the_store(worker, tmp_path):
    settings = settings_for(worker, tmp_path)
    with uvicorn_server(create_app(settings)) as first, uvicorn_server(create_app(settings)) as second:
        opening = post_stream(first, take=4)
        response_id = opening[0]["response"]["id"]
        assert sdk(second).responses.retrieve(response_id).status == "in_progress"
        followed = read_again(second, response_id, 3)  # polled from the store until the terminal event
        assert followed[-1]["type"] in TERMINAL and followed[0]["sequence_number"] == 4
        assert read_again(first, response_id) == read_again(second, response_id) == opening + followed


def test_cancel_ends_the_stream_and_its_replay(client, server):
    payload = {"input": "Tell me a long story.", **RUNNING, "max_output_tokens": 400, "background": True,
               "stream": True}
    events = []
    with httpx.stream("POST", f"{server}/v1/responses", json=payload, timeout=60) as response:
        for event in events_of(response):
            events.append(event)
            if len(events) == 8:
                assert client.responses.cancel(events[0]["response"]["id"]).status == "cancelled"
    response_id = events[0]["response"]["id"]
    assert not {event["type"] for event in events} & set(TERMINAL)  # the stream just ends: no event for it
    assert client.responses.retrieve(response_id).status == "cancelled"
    assert read_again(server, response_id) == events


def test_a_gateway_that_stops_ends_its_streams_failed(worker, tmp_path):
    settings = settings_for(worker, tmp_path)
    with uvicorn_server(create_app(settings)) as url:
        opening = post_stream(url, take=5, max_output_tokens=400)
    with uvicorn_server(create_app(settings)) as url:
        events = read_again(url, opening[0]["response"]["id"])
    assert events[:5] == opening and events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and "stopped" in events[-1]["response"]["error"]["message"]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))


def test_a_stop_during_the_runs_clean_up_still_writes_every_event_before_the_lease_goes(worker, tmp_path):
    """A shutdown's stop landing while a finished run writes its last events
    (slowly here) must not give up the lease first: a reader on another
    gateway would take the run for done and miss the terminal event."""
    settings = settings_for(worker, tmp_path)
    app = create_app(settings)
    with uvicorn_server(app) as url, uvicorn_server(create_app(settings)) as other:
        store, loop = app.state.store, {}
        write = store.append_response_events

        async def slow_last_write(response_id, events):
            loop["loop"] = asyncio.get_running_loop()
            if any(event.kind in TERMINAL for event in events):
                await asyncio.sleep(1.0)
            return await write(response_id, events)

        store.append_response_events = slow_last_write
        posted = post_stream(url, max_output_tokens=12)  # ends as the log closes, before its last write
        runs = app.state.background_responses
        response_id = posted[0]["response"]["id"]
        loop["loop"].call_soon_threadsafe(runs._stop, runs._runs[response_id], "stopped")  # as close() does
        while runs.runs_here(response_id):
            time.sleep(0.01)
        assert read_again(other, response_id) == posted


def test_a_stop_while_the_run_gives_back_its_conversation_still_ends_its_stream(worker, tmp_path):
    app = create_app(settings_for(worker, tmp_path))
    with uvicorn_server(app) as url:
        conversation = sdk(url).conversations.create()
        store, loop = app.state.store, {}
        end_turn = store.end_turn

        async def slow_end_turn(*args, **kwargs):
            loop["loop"] = asyncio.get_running_loop()
            await asyncio.sleep(1.0)
            return await end_turn(*args, **kwargs)

        store.end_turn = slow_end_turn
        runs = app.state.background_responses
        stopped = []

        def stop_when_ending() -> None:  # the stop lands in the work's clean-up (turn.end)
            while "loop" not in loop:
                time.sleep(0.005)
            run = next(iter(runs._runs.values()))
            loop["loop"].call_soon_threadsafe(runs._stop, run, "stopped")
            stopped.append(run)

        stopper = threading.Thread(target=stop_when_ending)
        stopper.start()
        events = post_stream(url, input="x " * 5000, conversation=conversation.id)  # fails at once
        stopper.join()
        assert [event["type"] for event in events][-1] == "response.failed"  # the stream ended
        while runs.runs_here(stopped[0].response_id):
            time.sleep(0.01)
        assert stopped[0].events.closed and read_again(url, stopped[0].response_id) == events


def test_a_dead_gateways_stream_ends_failed_once_its_lease_ran_out(worker, tmp_path):
    """A gateway killed mid-answer wrote some events and stopped renewing its
    lease: a reader gets those, then (once the lease has run out) a
    response.failed, as the response reads failed."""
    response = {"id": "resp_" + "b" * 32, "object": "response", "created_at": int(time.time()),
                "status": "in_progress", "background": True, "error": None, "output": [], "model": MODEL}
    written = [ResponseEvent(n, kind, frame_of(kind, n, response=response))
               for n, kind in enumerate(("response.created", "response.queued", "response.in_progress"))]

    async def orphan() -> None:
        async with await Store.open(StoreConfig.from_settings(settings_for(worker, tmp_path))) as store:
            await store.record_response(response, user=None, conversation=[], call_names={}, input_items=[])
            await store.begin_background(response["id"], "dead-gateway", 1.5)
            await store.append_response_events(response["id"], written)

    with uvicorn_server(create_app(settings_for(worker, tmp_path))) as url:
        asyncio.run(orphan())
        started = time.monotonic()
        events = read_again(url, response["id"], 0)
        assert time.monotonic() - started > 0.5  # followed until the lease ran out
        assert [e["type"] for e in events] == ["response.queued", "response.in_progress", "response.failed"]
        assert events[-1]["sequence_number"] == 3 and events[-1]["response"]["status"] == "failed"
        assert sdk(url).responses.retrieve(response["id"]).status == "failed"


def test_what_cannot_be_streamed_again_is_a_400(client, server):
    synchronous = client.responses.create(input="Hi", **GREEDY)
    polled = client.responses.create(input="Hi", background=True, **GREEDY)
    wait_for(client, polled.id, ("completed", "incomplete"))
    for response_id, words in ((synchronous.id, "answered in its request"), (polled.id, "without stream: true")):
        with pytest.raises(openai.BadRequestError) as refused:
            list(client.responses.retrieve(response_id, stream=True))
        assert error_of(refused)["param"] == "stream" and words in error_of(refused)["message"]
    answer = httpx.get(f"{server}/v1/responses/{polled.id}", params={"stream": "true", "starting_after": "-2"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "starting_after"
    answer = httpx.get(f"{server}/v1/responses/resp_unknown", params={"stream": "true"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "response_not_found"
    # without stream, starting_after is ignored (the object)
    assert httpx.get(f"{server}/v1/responses/{polled.id}", params={"starting_after": "3"}).json()["id"] == polled.id


def test_a_streamed_background_response_that_fails_at_once_ends_with_its_error(client, server):
    events = post_stream(server, input="x " * 5000)  # longer than the tiny model's context
    assert [event["type"] for event in events] == ["response.created", "response.queued", "error",
                                                   "response.failed"]
    assert events[2]["code"] == events[-1]["response"]["error"]["code"] == "context_length_exceeded"
    assert events[-1]["response"]["status"] == "failed"
    assert client.responses.retrieve(events[0]["response"]["id"]).status == "failed"


# ---- the event log's rules, on a store double ----------------------------------------------
class Events:
    """The store's event methods, in memory; `running` is the lease's state,
    `fail_writes` makes the next writes fail."""

    def __init__(self) -> None:
        self.rows: dict[str, list[ResponseEvent]] = {}
        self.writes = 0
        self.fail_writes = 0
        self.running = True
        self.response: dict = {"status": "in_progress"}

    async def append_response_events(self, response_id: str, events) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            raise ConnectionError("store unreachable")
        self.writes += 1
        kept = self.rows.setdefault(response_id, [])
        kept.extend(ResponseEvent(e.sequence_number, e.kind, e.frame) for e in events
                    if e.sequence_number >= len(kept))

    async def response_events(self, response_id: str, *, after: int = -1, limit: int = 500):
        return [e for e in self.rows.get(response_id, []) if e.sequence_number > after][:limit]

    async def last_response_event(self, response_id: str) -> ResponseEvent | None:
        return (self.rows.get(response_id) or [None])[-1]

    async def background_running(self, response_id: str) -> bool:
        return self.running


def frames(kinds: list[str], start: int = 0) -> list[str]:
    return [frame_of(kind, start + n) for n, kind in enumerate(kinds)]


def test_kind_of_reads_an_sse_frame():
    assert kind_of(frame_of("response.output_text.delta", 3, delta="a\nb")) == "response.output_text.delta"
    assert kind_of("data: [DONE]\n\n") == "message"


async def test_readers_here_follow_as_events_come_and_end_with_the_run():
    store = Events()
    log = EventLog(store, "resp_x", flush_s=0.01)
    log.append(frames(["response.created", "response.queued"]))
    log.start_flushing()
    late = asyncio.ensure_future(_collect(log.follow(0)))  # joins after the first event
    early = asyncio.ensure_future(_collect(log.follow()))
    await asyncio.sleep(0.02)
    log.append(frames(["response.in_progress", "response.output_text.delta"], 2))
    await asyncio.sleep(0.02)
    log.append(frames(["response.completed"], 4))
    await log.close()
    assert [kind_of(f) for f in await early] == ["response.created", "response.queued", "response.in_progress",
                                                 "response.output_text.delta", "response.completed"]
    assert len(await late) == 4
    assert [e.sequence_number for e in store.rows["resp_x"]] == [0, 1, 2, 3, 4]
    assert store.writes <= 4  # batched, not one write per event
    assert await _collect(log.follow(2)) == [e.frame for e in log.events[3:]]  # a closed log reads whole


async def test_a_failed_write_is_retried_and_the_last_ones_written_on_close():
    store = Events()
    store.fail_writes = 2
    log = EventLog(store, "resp_y", flush_s=0.01)
    log.append(frames(["response.created", "response.queued"]))
    log.start_flushing()
    await asyncio.sleep(0.08)
    log.append(frames(["response.completed"], 2))
    await log.close()
    assert [e.sequence_number for e in store.rows["resp_y"]] == [0, 1, 2]


async def test_replay_ends_at_the_terminal_event_and_pages():
    store = Events()
    kinds = ["response.created"] + ["response.output_text.delta"] * (PAGE + 10) + ["response.completed"]
    await store.append_response_events("r", [ResponseEvent(n, kind_of(f), f) for n, f in enumerate(frames(kinds))])
    got = await _collect(replay(store, "r", -1, _never, poll_s=0.01))
    assert len(got) == len(kinds) and kind_of(got[-1]) == "response.completed"


async def test_replay_follows_a_running_response_and_a_dead_runs_stream_ends_failed():
    store = Events()
    await store.append_response_events("r", [ResponseEvent(0, "response.created", frames(["response.created"])[0])])
    reader = asyncio.ensure_future(_collect(replay(store, "r", -1, _failed, poll_s=0.01)))
    await asyncio.sleep(0.05)
    assert not reader.done()  # still running: it waits for more
    delta = frames(["response.output_text.delta"], 1)[0]
    await store.append_response_events("r", [ResponseEvent(1, "response.output_text.delta", delta)])
    await asyncio.sleep(0.05)
    store.running = False  # the lease ran out without a terminal event
    got = await asyncio.wait_for(reader, 5)
    assert [kind_of(f) for f in got] == ["response.created", "response.output_text.delta", "response.failed"]
    assert json.loads(got[-1].split("data: ", 1)[1])["sequence_number"] == 2


async def test_a_reader_after_a_real_terminal_event_gets_nothing_more():
    store = Events()
    store.running = False
    kinds = ["response.created", "error", "response.failed"]
    await store.append_response_events("r", [ResponseEvent(n, kind_of(f), f) for n, f in enumerate(frames(kinds))])
    for after in (2, 9, 2**31 - 1):
        assert await _collect(replay(store, "r", after, _failed)) == []


async def test_a_second_close_writes_what_the_first_could_not():
    store = Events()
    log = EventLog(store, "resp_z")
    log.append(frames(["response.created"]))
    store.fail_writes = 1
    await log.close()
    assert "resp_z" not in store.rows
    await log.close()
    assert len(store.rows["resp_z"]) == 1


async def test_a_cancelled_runs_replay_just_ends():
    store = Events()
    store.running = False
    await store.append_response_events("r", [ResponseEvent(0, "response.created", frames(["response.created"])[0])])

    async def cancelled():
        return {"status": "cancelled"}

    assert len(await _collect(replay(store, "r", -1, cancelled))) == 1


async def _collect(frames_in) -> list[str]:
    return [frame async for frame in frames_in]


async def _never():
    raise AssertionError("a stream with its terminal event needs no settling")


async def _failed():
    return {"status": "failed", "error": {"code": "server_error", "message": "stopped"}}
