"""The gateway <-> worker wire protocol and the worker loop, on the tiny
engine (a worker in a thread, raw ZeroMQ sockets or the gateway's
WorkerClient): requests in, outputs back to their own gateway only, every
kind of bad request answered while the loop keeps serving, aborts, a
restarted remote worker noticed, a local worker that cannot load retried
with a delay, and a client that leaves a non-streaming request aborting it."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgpack
import pytest
import zmq

from pad_core.ipc import pack, unpack
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams, StepOutput
from server.metrics import Metrics
from server.settings import ServerSettings
from server.worker_client import RequestRejected, WorkerClient, WorkerUnavailable
from server_helpers import attached_client, uvicorn_server, worker_thread

MESSAGES = [{"role": "user", "content": "How do I sleep better?"}]


def request(request_id: str, max_tokens: int = 4, **guidance) -> dict:
    preferences = [Preference("short answers")] if guidance else []
    chat = ChatRequest(request_id, MESSAGES, preferences, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                       GuidanceParams(**guidance))
    return chat.to_dict()


class Gateway:
    """A raw DEALER, as a gateway would hold."""

    def __init__(self, context: zmq.Context, address: str):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, message: dict) -> None:
        self.socket.send(pack(message))

    def receive(self, kinds: tuple[str, ...], timeout: float = 30.0) -> dict:
        """The next message of one of `kinds` (heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.poll(100):
                message = unpack(self.socket.recv())
                if message["type"] in kinds:
                    return message
        raise TimeoutError(f"no {kinds} message")

    def outputs_until_finished(self, request_id: str) -> list[StepOutput]:
        outputs = []
        while not (outputs and outputs[-1].finished):
            message = self.receive(("outputs", "rejected"))
            assert message["type"] == "outputs", message
            outputs += [StepOutput.from_dict(o) for o in message["outputs"]]
            assert {o.request_id for o in outputs} == {request_id}
        return outputs


@pytest.fixture(scope="module")
def worker():
    with worker_thread() as running:
        yield running


@pytest.fixture
def gateway(worker):
    context = zmq.Context()
    gateway = Gateway(context, worker[0])
    yield gateway
    gateway.socket.close(linger=0)
    context.term()


def test_messages_round_trip_and_garbage_is_a_value_error():
    message = {"type": "add", "request": request("r1", top_k=3), "blob": b"\x00\xff"}
    again = unpack(pack(message))
    assert again["blob"] == b"\x00\xff"
    assert ChatRequest.from_dict(again["request"]) == ChatRequest.from_dict(message["request"])
    for frame in (b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"no": "type"}), msgpack.packb({"type": 3}), b""):
        with pytest.raises(ValueError, match="malformed"):
            unpack(frame)


def test_hello_add_outputs(gateway):
    gateway.send({"type": "hello"})
    ready = gateway.receive(("ready",))
    assert ready["info"]["served_model_name"] and ready["info"]["reward_models"] == ["self"]
    assert ready["instance"] and set(ready["stats"]) >= {"running_requests", "running_rows", "waiting_requests"}
    gateway.send({"type": "add", "request": request("plain")})
    outputs = gateway.outputs_until_finished("plain")
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 4
    assert sum(len(o.token_ids) for o in outputs) == 4


def test_bad_requests_are_rejected_and_the_loop_keeps_serving(gateway):
    gateway.socket.send(b"\xc1 not msgpack")  # dropped
    gateway.socket.send_multipart([b"two", b"frames"])  # dropped (three frames at the ROUTER)
    gateway.send({"type": "no-such-type"})  # ignored
    gateway.send({"type": "abort"})  # no request_id: logged, ignored
    cases = [
        (request("unknown-rm", reward_model="nope"), "pad.reward_model", "model_not_found"),
        (request("too-long", max_tokens=100_000), "max_tokens", "context_length_exceeded"),
        ({"request_id": "malformed", "messages": "not a list"}, None, None),
        ({"no_id": True}, None, None),
    ]
    for payload, param, code in cases:
        gateway.send({"type": "add", "request": payload})
        rejected = gateway.receive(("rejected", "outputs"))
        assert rejected["type"] == "rejected", rejected
        assert rejected["request_id"] == payload.get("request_id", "?")
        assert rejected["error"]["message"]
        if param is not None:
            assert (rejected["error"]["param"], rejected["error"]["code"]) == (param, code)
    gateway.send({"type": "add", "request": request("after")})
    assert gateway.outputs_until_finished("after")[-1].finish_reason == "length"


def test_abort_ends_the_request_and_frees_its_rows(gateway, worker):
    gateway.send({"type": "add", "request": request("long", max_tokens=400, weight=1.0)})
    first = gateway.receive(("outputs",))
    assert first["stats"]["running_rows"] == 2  # base row + one reward row
    gateway.send({"type": "abort", "request_id": "long"})
    outputs = [StepOutput.from_dict(o) for o in first["outputs"]]
    while not outputs[-1].finished:
        outputs += [StepOutput.from_dict(o) for o in gateway.receive(("outputs",))["outputs"]]
    assert outputs[-1].finish_reason == "abort" and outputs[-1].completion_tokens < 400
    assert worker[1].engine.stats()["running_rows"] == 0


def test_each_gateway_gets_only_its_own_outputs(worker):
    context = zmq.Context()
    a, b = Gateway(context, worker[0]), Gateway(context, worker[0])
    try:
        a.send({"type": "add", "request": request("from-a", max_tokens=6)})
        b.send({"type": "add", "request": request("from-b", max_tokens=3)})
        assert a.outputs_until_finished("from-a")[-1].completion_tokens == 6
        assert b.outputs_until_finished("from-b")[-1].completion_tokens == 3
    finally:
        for gateway in (a, b):
            gateway.socket.close(linger=0)
        context.term()


# ---- the gateway's client ------------------------------------------------
async def test_worker_client_multiplexes_rejects_and_aborts(worker):
    client = await attached_client(worker[0])
    try:
        chats = [ChatRequest.from_dict(request(f"c{i}", max_tokens=3 + i)) for i in range(4)]

        async def collect(chat):
            return [o async for o in client.generate(chat)]

        results = await asyncio.gather(*(collect(chat) for chat in chats))
        for i, outputs in enumerate(results):
            assert {o.request_id for o in outputs} == {f"c{i}"} and outputs[-1].completion_tokens == 3 + i
        with pytest.raises(RequestRejected) as rejected:
            await collect(ChatRequest.from_dict(request("bad", reward_model="nope")))
        assert rejected.value.error["code"] == "model_not_found"
        # Leaving early (a client that went away) aborts the request in the worker.
        stream = client.generate(ChatRequest.from_dict(request("left", max_tokens=400, weight=1.0)))
        await stream.__anext__()
        await stream.aclose()
        deadline = time.monotonic() + 10
        while worker[1].engine.stats()["running_rows"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert worker[1].engine.stats()["running_rows"] == 0 and not client.pending
    finally:
        await client.stop()


async def test_a_restarted_remote_worker_fails_in_flight_requests_at_once():
    """A remote worker restarted at the same address: the gateway notices the
    new instance (not after the long heartbeat timeout) and serves again."""
    with worker_thread() as (address, old):
        client = await attached_client(address, worker_heartbeat_timeout=600)
        try:
            stream = client.generate(ChatRequest.from_dict(request("lost", max_tokens=400, weight=1.0)))
            await stream.__anext__()
            old.broadcast = lambda message: None  # killed, it says nothing ("stopped")
            old.running = False  # the worker stops mid-request...
            await asyncio.sleep(0.3)
        except BaseException:
            await client.stop()
            raise
    try:
        with worker_thread(address):  # ...and a new one takes its address
            started = time.monotonic()
            with pytest.raises(WorkerUnavailable, match="restarted"):
                async for _ in stream:
                    pass
            assert time.monotonic() - started < 15
            deadline = time.monotonic() + 15
            while not client.ready:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            outputs = [o async for o in client.generate(ChatRequest.from_dict(request("next")))]
            assert outputs[-1].finish_reason == "length"
    finally:
        await client.stop()


async def test_a_local_worker_that_cannot_load_is_retried_with_a_delay(tmp_path):
    settings = ServerSettings(model=str(tmp_path / "no-such-model"), data_dir=tmp_path, log_level="error")
    client = WorkerClient(settings, Metrics())
    await client.start()
    try:
        deadline = time.monotonic() + 120
        while "exited" not in client.down_reason:
            assert time.monotonic() < deadline, "the worker never exited"
            await asyncio.sleep(0.1)
        assert not client.ready and "restarting it in 1 s" in client.down_reason
        with pytest.raises(WorkerUnavailable):
            client.check_available()
    finally:
        await client.stop()


# ---- the HTTP side ---------------------------------------------------------
def test_a_client_leaving_a_non_streaming_request_aborts_it(worker, tmp_path):
    from server.app import create_app

    app = create_app(ServerSettings(worker_address=worker[0], data_dir=tmp_path))
    with uvicorn_server(app) as url:
        body = {"model": "smollm2-135m-instruct", "messages": MESSAGES, "max_tokens": 450, "temperature": 0,
                "preference": ["short answers", "humour", "french"]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 10
        while 'pad_requests_total{status="499"} 1.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.05)
        # The gateway counts the 499 as it sends the abort; the worker frees the rows at its next step.
        drained = {"running_requests": 0, "running_rows": 0, "waiting_requests": 0}.items()
        while not worker[1].engine.stats().items() >= drained:
            assert time.monotonic() < deadline, "the aborted request kept its rows"
            time.sleep(0.05)
        answer = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


async def test_work_nobody_waits_for_is_withdrawn_from_the_tokenizer_thread(worker):
    """A /tokenize ask that timed out, and a chat aborted while it waited to
    be tokenized, are dropped from the worker's one tokenizer thread instead
    of running after everyone has left."""
    import threading

    address, served = worker
    gate = threading.Event()
    served._tokenizer_thread.submit(gate.wait, 30)  # the thread is busy (a huge prompt, say)
    prepared = []
    prepare = served.prepare
    served.prepare = lambda chat: prepared.append(chat.request_id) or prepare(chat)
    client = await attached_client(address)
    try:
        with pytest.raises(WorkerUnavailable):
            await client.tokenize({"kind": "text", "prompt": "hello"}, timeout=0.2)
        stream = client.generate(ChatRequest.from_dict(request("queued")))
        waiting = asyncio.ensure_future(stream.__anext__())
        deadline = time.monotonic() + 10
        while "queued" not in served.preparing:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()  # the client left: an abort
        while served.tokenizing or served.preparing:
            assert time.monotonic() < deadline, (served.tokenizing, served.preparing)
            await asyncio.sleep(0.01)
        gate.set()
        assert (await client.tokenize({"kind": "text", "prompt": "hello"}))["count"] > 0  # still serving
        assert prepared == []  # the aborted chat was never tokenized
    finally:
        gate.set()
        await client.stop()


async def test_every_gateway_of_a_worker_learns_of_a_reward_adapter_loaded_or_unloaded(tmp_path, tokenizer):
    from test_lora import save_random_adapter

    save_random_adapter(tmp_path / "shared", tokenizer, seed=1)
    with worker_thread() as (address, _):
        one, other = await attached_client(address), await attached_client(address)
        try:
            await one.load_adapter("shared", str(tmp_path / "shared"))
            deadline = time.monotonic() + 10
            while "shared" not in other.model_info["reward_models"]:
                assert time.monotonic() < deadline, "the other gateway never heard of the new adapter"
                await asyncio.sleep(0.05)
            assert other.model_info["reward_model_types"]["shared"] == "lora"
            reply = await other.unload_adapter("shared")
            assert reply["in_use"] == 0 and "shared" not in other.model_info["reward_models"]
            while "shared" in one.model_info["reward_models"]:
                assert time.monotonic() < deadline, "the first gateway never heard of the unload"
                await asyncio.sleep(0.05)
        finally:
            await one.stop()
            await other.stop()
