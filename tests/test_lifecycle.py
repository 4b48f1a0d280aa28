"""Lifecycle regressions found by the soak (benchmarks/soak.py) on the
embedded model, checked here on the tiny engine: the worker gives freed heap
memory back to the OS after work (its RSS ratcheted up by 1.7 GiB in 11
minutes otherwise); a worker that dies takes its running requests out of
the gauges; an answer that ends inside a character keeps the tokens held
back for it (the text of its whole decode); and the soak script itself
runs clean for a few seconds."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import zmq
from server_helpers import attached_client, uvicorn_server, worker_thread

from pad_core.ipc import pack, unpack
from pad_core.memory import IDLE_TRIM_GAP_S, HeapTrimmer, malloc_trim
from pad_core.types import ChatRequest, Preference, SamplingParams
from server.metrics import Metrics
from server.settings import ServerSettings
from server.worker_client import WorkerClient, WorkerUnavailable

MESSAGES = [{"role": "user", "content": "How do I sleep better?"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_trimmer(interval_s: float = 30.0) -> tuple[HeapTrimmer, FakeClock, list[int]]:
    clock, calls = FakeClock(), []
    return HeapTrimmer(interval_s, trim=lambda: calls.append(1), clock=clock), clock, calls


def test_the_heap_is_trimmed_once_when_the_worker_goes_idle_after_work():
    trimmer, clock, calls = counting_trimmer()
    for _ in range(50):  # idle from the start: nothing to give back
        clock.now += 1
        trimmer.after_iteration(worked=False, idle=True)
    assert calls == []
    trimmer.after_iteration(worked=True, idle=False)
    trimmer.after_iteration(worked=True, idle=True)  # the last request finished in this step
    assert len(calls) == 1
    for _ in range(50):  # staying idle: no more trims
        clock.now += 1
        trimmer.after_iteration(worked=False, idle=True)
    assert len(calls) == 1


def test_requests_trickling_in_trim_at_most_once_per_gap():
    trimmer, clock, calls = counting_trimmer()
    clock.now += 10
    for _ in range(10):  # a one-step request every 0.1 s
        trimmer.after_iteration(worked=True, idle=True)
        clock.now += 0.1
    assert len(calls) == 1
    clock.now += IDLE_TRIM_GAP_S
    trimmer.after_iteration(worked=False, idle=True)  # the work since the last trim is trimmed on the next idle turn
    assert len(calls) == 2


def test_a_load_that_never_pauses_is_trimmed_every_interval():
    clock, times = FakeClock(), []
    trimmer = HeapTrimmer(30.0, trim=lambda: times.append(clock.now), clock=clock)
    for _ in range(300):  # 5 minutes of 1 s steps, never idle
        clock.now += 1
        trimmer.after_iteration(worked=True, idle=False)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert len(times) >= 9 and all(30 <= gap <= 31 for gap in gaps)  # 30 s of work each (from its first step)


def test_malloc_trim_runs_where_the_c_library_has_it():
    trim = malloc_trim()
    if trim is not None:  # glibc
        trim()
    HeapTrimmer(trim=None).after_iteration(worked=True, idle=True)  # never fails, whatever the C library


def test_the_worker_loop_trims_after_its_requests_finish(monkeypatch):
    """Through the real worker loop: served requests, then one trim on idle."""
    # One idle trim a minute at most: should the loop go idle between the requests
    # (a slow machine), a second idle trim cannot fall inside the wait below.
    monkeypatch.setattr("pad_core.memory.IDLE_TRIM_GAP_S", 60.0)
    with worker_thread() as (address, worker):
        calls = []
        worker.trimmer.trim = lambda: calls.append(time.monotonic())
        worker.trimmer.last = time.monotonic() - 120  # no gap to wait for
        context = zmq.Context()
        gateway = context.socket(zmq.DEALER)
        gateway.setsockopt(zmq.LINGER, 0)
        gateway.connect(address)
        try:
            for index in range(3):
                chat = ChatRequest(f"trim-{index}", MESSAGES, sampling=SamplingParams(max_tokens=3, temperature=0.0))
                gateway.send(pack({"type": "add", "request": chat.to_dict()}))
            finished = set()
            deadline = time.monotonic() + 30
            while len(finished) < 3 and time.monotonic() < deadline:
                if gateway.poll(100):
                    message = unpack(gateway.recv())
                    finished |= {o["request_id"] for o in message.get("outputs", []) if o["finish_reason"]}
            assert len(finished) == 3
            deadline = time.monotonic() + 5
            while not calls and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.5)  # idle turns of the loop: no further trim
            assert len(calls) == 1
            assert not worker.engine.has_unfinished()
        finally:
            gateway.close(linger=0)
            context.term()


async def test_the_soak_script_passes_on_the_tiny_engine(tmp_path):
    """benchmarks/soak.py end to end for a few seconds (every scenario, the
    invariants, the idle gauges), over real HTTP to the gateway and a worker
    loop on the tiny engine."""
    from benchmarks import soak

    from server.app import create_app
    from server.settings import ServerSettings

    with worker_thread() as (address, _), uvicorn_server(
        create_app(ServerSettings(worker_address=address, data_dir=tmp_path))
    ) as url:
        args = soak.parse_args(["--base-url", url, "--duration", "4", "--concurrency", "3", "--max-tokens", "8",
                                "--gateway-pid", str(os.getpid()), "--sample-every", "1", "--idle-settle", "0.2",
                                "--show", "0", "--answers-out", str(tmp_path / "answers.jsonl")])
        assert await soak.soak(args) == 0
    outcomes = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert {o["scenario"] for o in outcomes} == set(soak.SCENARIOS)  # one round of each comes first
    assert any(o["answered"] for o in outcomes)


def gauges(metrics: Metrics) -> dict[str, float]:
    values = {}
    for line in metrics.render().decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("pad_queue_depth", "pad_running_requests", "pad_running_rows", "pad_worker_up"):
            values[name] = float(value)
    return values


async def test_a_dead_worker_leaves_no_running_requests_in_the_gauges():
    """The queue and batch gauges come from the worker's stats: when it dies
    mid-request and no new one gets ready, they go to 0 with its requests
    (they read the dead worker's last values forever before)."""
    with worker_thread(step_delay=0.02) as (address, worker):
        # A heartbeat timeout with room for a slow box's stalls before the worker stops answering.
        client = await attached_client(address, worker_heartbeat_timeout=3.0)
        try:
            chat = ChatRequest("lost", MESSAGES, [Preference("short answers")],
                               SamplingParams(max_tokens=400, temperature=0.0))
            stream = client.generate(chat)
            await stream.__anext__()
            await stream.__anext__()  # a decode step's outputs carry the stats
            assert gauges(client.metrics)["pad_running_requests"] == 1
            assert gauges(client.metrics)["pad_running_rows"] == 2
            worker.broadcast = lambda message: None  # killed, it says nothing ("stopped"): the heartbeat tells
            worker.running = False  # the worker stops answering mid-request, for good
            with pytest.raises(WorkerUnavailable):
                async for _ in stream:
                    pass
            assert not client.ready
            assert gauges(client.metrics) == {"pad_queue_depth": 0, "pad_running_requests": 0, "pad_running_rows": 0,
                                              "pad_worker_up": 0}
        finally:
            await client.stop()


# ---- an answer that ends inside a character ----------------------------
def half_character_token(tokenizer) -> int:
    """A token holding a space and the first byte of a 3-byte character."""
    token_id = tokenizer.convert_tokens_to_ids("Ġâ")
    assert tokenizer.decode([token_id]) == " \ufffd"
    return token_id


def test_an_answer_cut_inside_a_character_keeps_what_the_whole_decode_shows(engine, tokenizer):
    """The soak saw "1. Banana:" streamed where the tokens decode to
    "1. Banana: \\ufffd": the last token (a space and half an emoji) was held
    back and dropped when max_tokens cut the answer. A run of such tokens
    lost the whole answer; now the held tokens are flushed as it ends."""
    token_id = half_character_token(tokenizer)
    chat = ChatRequest("cut", MESSAGES, sampling=SamplingParams(max_tokens=3, temperature=0.0,
                                                                logit_bias=((token_id, 100.0),)))
    outputs = list(engine.generate([chat]))
    tokens = [t for o in outputs for t in o.token_ids]
    assert tokens == [token_id] * 3 and outputs[-1].finish_reason == "length"
    assert "".join(o.text for o in outputs) == tokenizer.decode(tokens) == " \ufffd \ufffd \ufffd"


def test_an_answer_ending_on_end_of_sequence_after_half_a_character_keeps_it(engine, tokenizer):
    token_id = half_character_token(tokenizer)
    chat = ChatRequest("eos", MESSAGES, sampling=SamplingParams(max_tokens=10, temperature=0.0, stop=["xyz"]))
    engine.add_chat(chat)
    state = engine.waiting[0]
    banana = tokenizer(" Banana", add_special_tokens=False)["input_ids"]
    outputs = [state.append_token(t) for t in (*banana, token_id, tokenizer.eos_token_id)]
    assert [o.finish_reason for o in outputs] == [None] * (len(banana) + 1) + ["stop"]
    assert "".join(o.text for o in outputs) == " Banana \ufffd"
    engine.abort("eos")
    engine.step()


def test_the_memory_limit_is_the_lowest_of_the_machine_and_the_cgroups_above_the_process(tmp_path):
    from pad_core.memory import memory_limit_bytes

    machine = memory_limit_bytes(tmp_path / "none", tmp_path / "none")
    v2 = tmp_path / "v2"
    (v2 / "system.slice" / "pad.service").mkdir(parents=True)
    (v2 / "system.slice" / "pad.service" / "memory.max").write_text("max\n")  # none on the unit itself
    (v2 / "system.slice" / "memory.max").write_text(f"{2**30}\n")  # 1 GiB on the slice above it
    own = tmp_path / "cgroup-v2"
    own.write_text("0::/system.slice/pad.service\n")
    assert memory_limit_bytes(v2, own) == min(machine, 2**30)
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    own.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\nnot a cgroup line\n")
    assert memory_limit_bytes(v1, own) == min(machine, 3 * 2**30)


def test_the_soak_checks_cut_constrained_answers_as_prefixes():
    """A constrained answer cut by max_tokens must be a prefix of a match
    (the `regex` module's partial matching); a complete one, a whole match."""
    from benchmarks.soak import PERSON_JSON, VLLM_CONSTRAINTS, follows

    choice, pattern, grammar = (pattern for _, pattern in VLLM_CONSTRAINTS)
    assert follows(choice, "positive", "stop") and not follows(choice, "posi", "stop")
    assert follows(choice, "posi", "length") and not follows(choice, "posx", "length")
    assert follows(pattern, "Paris, 12", "stop") and follows(pattern, "Pari", "length")
    assert not follows(pattern, "paris", "length")
    assert follows(grammar, "yes, because it is good.", "stop") and follows(grammar, "no, becau", "length")
    assert not follows(grammar, "maybe", "length")
    assert follows(PERSON_JSON, '{"name": "John Doe", "age": 30}', "stop")
    assert follows(PERSON_JSON, '{"age": 3, "name": "A \\"b\\""}', "stop")
    assert follows(PERSON_JSON, '{"name": "Jo', "length") and follows(PERSON_JSON, '{"age": 30, "na', "length")
    assert not follows(PERSON_JSON, '{"name": 12', "length") and not follows(PERSON_JSON, 'Sure! {"name"', "length")
    assert not follows(PERSON_JSON, '{"name": "x", "age": 1', "stop")


async def test_a_stop_signal_drains_the_worker_and_the_gateway_hears_it_at_once():
    """The worker's first stop signal (Worker.stop): the gateway hears
    "stopping" and sends no more (503 at once, /health down), the request it
    took streams to its end, then "stopped" marks the worker down at once (a
    remote worker's heartbeat timeout is 60 s); a hello meanwhile is
    answered "stopping", never "ready"."""
    with worker_thread(step_delay=0.01) as (address, worker):
        client = await attached_client(address, worker_heartbeat_timeout=600)
        try:
            chat = ChatRequest("taken", MESSAGES, sampling=SamplingParams(max_tokens=40, temperature=0.0,
                                                                          ignore_eos=True))
            stream = client.generate(chat)
            first = await stream.__anext__()
            worker.stop()
            await asyncio.sleep(0.3)
            assert client.state == "stopping" and not client.ready
            with pytest.raises(WorkerUnavailable):
                client.check_available()
            await client._send({"type": "hello"})  # as the supervisor does while not ready
            outputs = [first] + [output async for output in stream]
            assert outputs[-1].finish_reason == "length"
            assert sum(len(o.token_ids) for o in outputs) == 40  # finished, not cut
            deadline = time.monotonic() + 10
            while client.state != "down":
                assert time.monotonic() < deadline, client.state
                await asyncio.sleep(0.05)
            assert client.down_reason == "the worker stopped"
        finally:
            await client.stop()


async def test_a_spawned_worker_that_hangs_is_killed_and_restarted():
    """A local worker's process alive but silent past worker_heartbeat_timeout
    (a deadlock; SIGSTOP in the review) is killed, so the supervisor's exit
    path restarts it; within the timeout it is left alone."""
    import subprocess

    client = WorkerClient(ServerSettings(worker_address="tcp://127.0.0.1:9", worker_heartbeat_timeout=60), Metrics())
    client.process = subprocess.Popen(["sleep", "300"])  # stands in for a spawned worker
    try:
        client.state = "ready"
        client._last_message = time.monotonic()
        await client._supervise_once(time.monotonic() + 30)
        assert client.process.poll() is None
        await client._supervise_once(time.monotonic() + 61)
        assert client.process.wait(5) == -9
    finally:
        if client.process.poll() is None:
            client.process.kill()
        client.context.term()
