"""`pad run-batch`: OpenAI batch-format lines answered by a server, one result
line per input line, in order. The line checks without a server; the order,
the bound on requests in flight and the retries against a mock transport;
then the whole command over real HTTP in front of the worker loop on the
tiny engine, each answer compared with the same request sent directly."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings
from server.tools import run_batch
from server.tools.run_batch import BatchLine, parse_line, read_lines, run

MODEL = "smollm2-135m-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "How do I sleep better?"}], "max_tokens": 6,
        "temperature": 0}


def line(custom_id: str, url: str = "/v1/chat/completions", body: dict | None = None, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or CHAT, **extra})


@pytest.mark.parametrize(("raw", "problem"), [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"method": "POST", "url": "/v1/chat/completions", "body": {}}', "custom_id"),
    (b'{"custom_id": 5, "url": "/v1/chat/completions", "body": {}}', "custom_id"),
    (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {}, "extra": 1}', "unknown field"),
    (b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}', "method"),
    (b'{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "url must be one of"),
    (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": "hi"}', "body must be a JSON object"),
    (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {"stream": true}}', "cannot stream"),
    (b'{"custom_id": "\xff", "url": "/v1/chat/completions", "body": {}}', "not UTF-8"),
    (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {"temperature": NaN}}', "NaN is not a JSON value"),
    (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {"input": "\\ud800"}}', "not JSON"),
    (b'{"custom_id": "\\ud800", "url": "/v1/chat/completions", "body": {}}', "not JSON"),
])
def test_a_line_that_is_no_request_says_why(raw, problem):
    parsed = parse_line(7, raw, set())
    assert parsed.problem is not None and problem in parsed.problem and "line 7" in parsed.problem


def test_lines_are_requests_and_custom_ids_are_unique():
    source = io.BytesIO(f"{line('a')}\n\n{line('b', '/v1/completions', {'prompt': 'Hi'})}\n{line('a')}\n".encode())
    first, second, again = read_lines(source)  # the blank line is no request
    assert (first.custom_id, first.url, first.body, first.problem) == ("a", "/v1/chat/completions", CHAT, None)
    assert (second.number, second.url, second.body) == (3, "/v1/completions", {"prompt": "Hi"})
    assert again.custom_id == "a" and "given before" in again.problem


# ---- the runner, on a mock transport -------------------------------------------
def mock_client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://batch.test")


def results_of(out: io.StringIO) -> list[dict]:
    return [json.loads(text) for text in out.getvalue().splitlines()]


async def test_results_keep_the_input_order_and_in_flight_stays_bounded():
    in_flight, most = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        number = int(json.loads(request.content)["n"])
        await asyncio.sleep(0.05 if number == 0 else 0.001 * (number % 3))  # the first is the slowest
        in_flight -= 1
        return httpx.Response(200, json={"n": number}, headers={"x-request-id": f"req-{number}"})

    lines = [BatchLine(n + 1, f"c{n}", "/v1/chat/completions", {"n": n}) for n in range(40)]
    out = io.StringIO()
    async with mock_client(handler) as client:
        assert await run(iter(lines), client, out, concurrency=3) == (40, 0)
    results = results_of(out)
    assert [r["custom_id"] for r in results] == [f"c{n}" for n in range(40)]
    assert [r["response"]["body"]["n"] for r in results] == list(range(40))
    assert results[5]["response"]["request_id"] == "req-5" and results[5]["error"] is None
    assert len({r["id"] for r in results}) == 40 and results[0]["id"].startswith("batch_req_")
    assert most == 3


async def test_busy_answers_and_lost_connections_are_retried():
    calls: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        which = json.loads(request.content)["which"]
        calls[which] = calls.get(which, 0) + 1
        if which == "busy" and calls[which] <= 2:
            return httpx.Response(503, json={"error": {"message": "restarting", "code": "worker_unavailable"}})
        if which == "down":
            raise httpx.ConnectError("refused")
        if which == "refused":
            return httpx.Response(400, json={"error": {"message": "temperature too high", "type":
                                                       "invalid_request_error", "param": "temperature",
                                                       "code": "invalid_value"}})
        if which == "slow":
            raise httpx.ReadTimeout("no answer in time")
        if which == "garbled":
            return httpx.Response(500, text="<html>oops</html>")
        return httpx.Response(200, json={"ok": True})

    lines = [BatchLine(n, name, "/v1/chat/completions", {"which": name})
             for n, name in enumerate(("busy", "down", "refused", "garbled", "fine", "slow"), start=1)]
    lines.append(BatchLine(7, None, problem="line 7 is not JSON"))
    out = io.StringIO()
    async with mock_client(handler) as client:
        assert await run(iter(lines), client, out, concurrency=2, retries=3, backoff_s=0) == (2, 5)
    busy, down, refused, garbled, fine, slow, bad = results_of(out)
    # sent, maybe answered: never sent twice (a POST generates, and may store)
    assert slow["error"]["code"] == "request_failed" and calls["slow"] == 1
    assert busy["response"]["status_code"] == 200 and busy["error"] is None and calls["busy"] == 3
    assert down["response"] is None and down["error"]["code"] == "connection_error" and calls["down"] == 4
    assert refused["response"]["status_code"] == 400 and calls["refused"] == 1  # a refusal is no retry
    assert refused["error"] == {"code": "invalid_value", "message": "temperature too high"}
    assert refused["response"]["body"]["error"]["param"] == "temperature"
    assert garbled["error"]["code"] == "500" and "oops" in garbled["response"]["body"]["error"]["message"]
    assert fine["error"] is None
    assert bad == {**bad, "custom_id": None, "response": None,
                   "error": {"code": "invalid_request", "message": "line 7 is not JSON"}}


async def test_an_input_that_fails_mid_way_ends_the_run_with_the_lines_before_written():
    def lines():
        yield BatchLine(1, "a", "/v1/chat/completions", {})
        raise OSError("disk gone")

    out = io.StringIO()
    async with mock_client(lambda request: httpx.Response(200, json={})) as client:
        with pytest.raises(OSError, match="disk gone"):
            await run(lines(), client, out, concurrency=4)
    assert [r["custom_id"] for r in results_of(out)] == ["a"]


# ---- the command, on the tiny engine -------------------------------------------
@pytest.fixture(scope="module")
def server():
    with worker_thread() as (address, _worker), uvicorn_server(create_app(ServerSettings(
            worker_address=address, api_keys=["secret"]))) as url:
        yield url


def test_the_command_answers_every_line_as_a_direct_request_would(server, tmp_path, monkeypatch, capsys):
    requests = [
        ("plain", "/v1/chat/completions", CHAT),
        ("pad", "/v1/chat/completions", {**CHAT, "preference": "answer like a pirate"}),
        ("legacy", "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5,
                                       "temperature": 0}),
        ("responses", "/v1/responses", {"model": MODEL, "input": "Hi!", "max_output_tokens": 5, "temperature": 0,
                                        "store": False}),
        ("refused", "/v1/chat/completions", {**CHAT, "temperature": 9}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([line(*r) for r in requests] + ["{oops", line("plain")]) + "\n", encoding="utf-8")
    target = tmp_path / "out.jsonl"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code = run_batch.main(["-i", str(source), "-o", str(target), "--base-url", f"{server}/v1", "--api-key",
                           "secret", "--max-concurrency", "2", "--no-progress"])
    assert code == 1  # a refused request and two bad lines: their lines say why
    assert "7 requests, 4 answered, 3 failed" in capsys.readouterr().err
    results = [json.loads(text) for text in target.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in results] == ["plain", "pad", "legacy", "responses", "refused", None, "plain"]
    headers = {"authorization": "Bearer secret"}
    for result, (_, url, body) in zip(results[:4], requests[:4], strict=True):
        assert result["response"]["status_code"] == 200 and result["error"] is None
        direct = httpx.post(f"{server}{url}", json=body, headers=headers, timeout=60).json()
        if url == "/v1/responses":
            assert result["response"]["body"]["output"][0]["content"][0]["text"] == \
                direct["output"][0]["content"][0]["text"]
        else:
            got = result["response"]["body"]["choices"][0]
            assert got.get("message", got).get("content", got.get("text")) == \
                direct["choices"][0].get("message", direct["choices"][0]).get("content", direct["choices"][0].get("text"))
        assert result["response"]["request_id"]
    assert results[1]["response"]["body"]["pad"]["preferences"][0]["text"] == "answer like a pirate"
    assert results[4]["response"]["status_code"] == 400 and results[4]["error"]["code"]
    assert results[4]["response"]["body"]["error"]["param"] == "temperature"
    assert "not JSON" in results[5]["error"]["message"] and "given before" in results[6]["error"]["message"]


def test_the_command_without_failures_exits_0_and_a_wrong_key_fails_each_line(server, tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    source.write_text(line("one") + "\n", encoding="utf-8")
    target = tmp_path / "out.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    assert run_batch.main(["-i", str(source), "-o", str(target), "--base-url", server, "--no-progress"]) == 0
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    assert run_batch.main(["-i", str(source), "-o", str(target), "--base-url", server, "--no-progress"]) == 1
    result = json.loads(target.read_text(encoding="utf-8"))
    assert result["response"]["status_code"] == 401 and result["error"]["code"]


def test_paths_that_cannot_be_used_are_exit_2_before_any_server_starts(tmp_path, capsys):
    assert run_batch.main(["-i", str(tmp_path / "missing.jsonl"), "-o", "-"]) == 2
    (tmp_path / "in.jsonl").write_text(line("a"), encoding="utf-8")
    assert run_batch.main(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "no" / "out.jsonl")]) == 2
    assert "no folder" in capsys.readouterr().err
    same = str(tmp_path / "in.jsonl")
    assert run_batch.main(["-i", same, "-o", same]) == 2 and "overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "in.jsonl").read_text(encoding="utf-8") == line("a")  # untouched
    with pytest.raises(SystemExit):
        run_batch.main(["-i", "x", "-o", "y", "--max-concurrency", "0"])


async def test_a_busy_servers_429_is_retried_as_often_as_asked_with_capped_waits():
    """The Batch API retries a 429 for as long as the batch's window lasts
    (BATCH_RETRIES, waits capped at BATCH_MAX_BACKOFF_S), not 5 times: a
    server busy for minutes loses no line. pad run-batch keeps 5 tries."""
    from server.batches import BATCH_RETRIES, BatchRuns

    busy_for = {"n": 8}

    def answer(request: httpx.Request) -> httpx.Response:
        if busy_for["n"]:
            busy_for["n"] -= 1
            return httpx.Response(429, json={"error": {"message": "busy", "code": "queue_full"}})
        return httpx.Response(200, json={"id": "chatcmpl-1", "choices": []})

    line = next(run_batch.read_lines(io.BytesIO(json.dumps(
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}).encode())))
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://x") as client:
        given_up = await run_batch.send(client, line, retries=5, backoff_s=0.001)
        assert given_up["response"]["status_code"] == 429
        busy_for["n"] = 8
        kept_at = await run_batch.send(client, line, retries=BATCH_RETRIES, backoff_s=0.001, max_backoff_s=0.002)
        assert kept_at["response"]["status_code"] == 200 and busy_for["n"] == 0
    # a batch keeps to half the queue, so interactive clients keep room beside it
    runs = BatchRuns(None, None, ServerSettings(max_queue=2, batch_concurrency=16))
    assert runs._concurrency == 1
