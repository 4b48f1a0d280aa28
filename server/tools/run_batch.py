"""`pad run-batch`: a file of requests in OpenAI's Batch API format, answered
by a server, into a file of results in the same format (vLLM's `run-batch`).

    pad run-batch -i requests.jsonl -o results.jsonl          # starts its own server on the embedded model
    pad run-batch -i requests.jsonl -o results.jsonl --base-url http://host:8000/v1

Each input line is a request:
    {"custom_id": "user-17", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
(`url`: /v1/chat/completions, /v1/completions, /v1/responses or Anthropic's
/v1/messages; a body takes
every field the endpoint takes, `preference` and `pad` included, but not
`stream`). Each output line, in the input's order, is its result:
    {"id": "batch_req_...", "custom_id": "user-17",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}
An answer the server refused keeps its response (status and OpenAI error
body) and names its error in `error`; a line that is no request (not JSON,
a field missing, another URL, a custom_id seen before) has `response` null
and its `error`. Nothing is skipped: one line out per line in.

Requests run `--max-concurrency` at a time (the server batches them on the
GPU); a 429 or 503 (queue full, worker restarting) or a connection that could
not be made is retried with backoff (a request that may have reached the server, a read
timeout, is not sent twice). Results are written as they come in order, so the
memory held is bounded by the requests in flight, not the file. Exit code
0 when every request was answered 2xx, 1 when any was not (its line says
why), 2 when the files or the server could not be used.

Written here rather than taken from vLLM (`vllm run-batch`), which cannot be
installed beside this server's pinned torch and has no `preference`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import IO, Any

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
RETRIED_STATUSES = (429, 502, 503, 504)
MAX_BACKOFF_S = 16.0  # the longest wait between two tries of one request
RETRIED_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class BatchLine:
    """One input line: a request to send, or why it is none."""

    number: int  # 1-based, for messages
    custom_id: str | None
    url: str | None = None
    body: dict[str, Any] | None = None
    problem: str | None = None


def no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def parse_line(number: int, raw: bytes, seen: set[str]) -> BatchLine:
    """An input line as a request, or as the problem that makes it none
    (checked here so that a bad line costs no server call)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BatchLine(number, None, problem=f"line {number} is not UTF-8: {exc}")
    try:
        request = json.loads(text, parse_constant=no_constant)
        json.dumps(request, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") is no text to send
    except ValueError as exc:  # UnicodeEncodeError included
        return BatchLine(number, None, problem=f"line {number} is not JSON: {exc}")
    if not isinstance(request, dict):
        return BatchLine(number, None, problem=f"line {number} is not a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(number, None, problem=f"line {number}: custom_id must be a non-empty string")
    if custom_id in seen:
        return BatchLine(number, custom_id, problem=f"line {number}: custom_id {custom_id!r} was given before "
                         "(each request's must be unique)")
    seen.add(custom_id)
    unknown = sorted(set(request) - {"custom_id", "method", "url", "body"})
    if unknown:
        return BatchLine(number, custom_id, problem=f"line {number}: unknown field(s) {unknown}")
    if request.get("method", "POST") != "POST":
        return BatchLine(number, custom_id, problem=f"line {number}: method must be POST")
    url = request.get("url")
    if url not in URLS:
        return BatchLine(number, custom_id, problem=f"line {number}: url must be one of {', '.join(URLS)}, "
                         f"not {str(url)[:80]!r}")
    body = request.get("body")
    if not isinstance(body, dict):
        return BatchLine(number, custom_id, problem=f"line {number}: body must be a JSON object")
    if body.get("stream"):
        return BatchLine(number, custom_id, problem=f"line {number}: a batch request cannot stream (stream: true)")
    return BatchLine(number, custom_id, url, body)


def read_lines(source: IO[bytes]) -> Iterator[BatchLine]:
    seen: set[str] = set()
    for number, raw in enumerate(source, start=1):
        if raw.strip():  # blank lines are no requests (a trailing newline)
            yield parse_line(number, raw, seen)


def result_line(line: BatchLine, response: httpx.Response | None, error: dict[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None,
                           "error": error}
    if response is not None:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text[:1000], "type": "server_error", "param": None, "code": None}}
        out["response"] = {"status_code": response.status_code,
                           "request_id": response.headers.get("x-request-id"), "body": body}
        if response.status_code >= 400 and error is None:
            detail = body.get("error") if isinstance(body, dict) else None
            detail = detail if isinstance(detail, dict) else {}
            # OpenAI's errors name a code (else the status stands for it); Anthropic's (/v1/messages) a type
            anthropic = isinstance(body, dict) and body.get("type") == "error"
            out["error"] = {"code": detail.get("type" if anthropic else "code") or str(response.status_code),
                            "message": detail.get("message") or f"HTTP {response.status_code}"}
    return out


async def send(client: httpx.AsyncClient, line: BatchLine, retries: int, backoff_s: float,
               max_backoff_s: float = MAX_BACKOFF_S, retry_log_level: int = logging.WARNING) -> dict[str, Any]:
    """The result of one request, retried while the server is busy or away
    (the waits double from backoff_s, up to max_backoff_s)."""
    if line.problem is not None:
        return result_line(line, None, {"code": "invalid_request", "message": line.problem})
    last_problem = ""
    for attempt in range(retries + 1):
        if attempt:
            await asyncio.sleep(min(backoff_s * 2 ** (attempt - 1), max_backoff_s))
        try:
            response = await client.post(line.url, json=line.body)
        except RETRIED_ERRORS as exc:  # the request never reached the server: sending it again is safe
            last_problem = f"{type(exc).__name__}: {exc}"
            logger.log(retry_log_level, "request %r: %s (attempt %d)", line.custom_id, last_problem, attempt + 1)
            continue
        except Exception as exc:  # a timeout after it was sent (not sent twice), or anything else: its line's
            return result_line(line, None, {"code": "request_failed", "message": f"{type(exc).__name__}: {exc}"})
        if response.status_code in RETRIED_STATUSES and attempt < retries:
            logger.log(retry_log_level, "request %r: HTTP %d (attempt %d)", line.custom_id, response.status_code,
                       attempt + 1)
            continue
        return result_line(line, response, None)
    return result_line(line, None, {"code": "connection_error", "message": f"no answer after {retries + 1} "
                                    f"attempts: {last_problem}"})


async def run(lines: Iterator[BatchLine], client: httpx.AsyncClient, out: IO[str] | None, *, concurrency: int,
              retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = MAX_BACKOFF_S,
              retry_log_level: int = logging.WARNING, total: int | None = None,
              progress: bool = False, on_result: Callable[[BatchLine, dict[str, Any]], None] | None = None
              ) -> tuple[int, int]:
    """Answers every line, `concurrency` at a time, and writes the results in
    the input's order as they come (to `out`, or hands each with its line to
    `on_result`: the server's Batch API); returns (answered 2xx, not). A slow
    request holds back the writing of the ones after it, not their sending,
    up to 4 x `concurrency` answers waiting for it (the memory's bound)."""
    in_flight, unwritten = asyncio.Semaphore(concurrency), asyncio.Semaphore(4 * concurrency)
    order: asyncio.Queue[tuple[BatchLine, asyncio.Task] | None] = asyncio.Queue()
    counts = [0, 0]

    async def answer(line: BatchLine) -> dict[str, Any]:
        try:
            return await send(client, line, retries, backoff_s, max_backoff_s, retry_log_level)
        finally:
            in_flight.release()

    async def start_all() -> None:
        try:
            for line in lines:
                await unwritten.acquire()
                await in_flight.acquire()
                order.put_nowait((line, asyncio.ensure_future(answer(line))))
        finally:
            order.put_nowait(None)

    starter = asyncio.ensure_future(start_all())
    bar = tqdm(total=total, unit="req", desc="run-batch", disable=not progress, file=sys.stderr)
    try:
        while (sent := await order.get()) is not None:
            line, task = sent
            result = await task
            counts[0 if result["error"] is None else 1] += 1
            if on_result is not None:
                on_result(line, result)
            else:
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
                out.flush()
            unwritten.release()
            bar.update(1)
        await starter  # its failure (an input that cannot be read) is the run's
    finally:
        bar.close()
        starter.cancel()
        while not order.empty():
            if (sent := order.get_nowait()) is not None:
                sent[1].cancel()
    return counts[0], counts[1]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pad run-batch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True, help="requests, one JSON object a line ('-': stdin)")
    parser.add_argument("-o", "--output", required=True, help="results, one a line, in the input's order "
                        "('-': stdout)")
    parser.add_argument("--base-url", help="an OpenAI-compatible server's /v1 URL (default: start `pad serve` "
                        "on a free local port)")
    parser.add_argument("--api-key", default=None, help="its API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--max-concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--retries", type=int, default=5, help="retries of a request on 429/502/503/504 or a "
                        "connection that could not be made (default 5)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an argument for the `pad serve` it starts (repeat; e.g. --serve-arg=--dtype=float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    return args


@contextlib.contextmanager
def opened(path: str, mode: str) -> Iterator[IO]:
    """The input as bytes (a line that is no UTF-8 is a bad line, not the
    run's end), the output as UTF-8 text; '-' is stdin / stdout."""
    if path == "-":
        yield sys.stdin.buffer if mode == "rb" else sys.stdout
        return
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
        yield handle


def count_requests(path: str) -> int | None:
    """The input's requests, for the progress bar (None for stdin)."""
    if path == "-":
        return None
    with open(path, "rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def root_of(base_url: str) -> str:
    """The server's root from its /v1 base URL (batch lines name /v1/... paths)."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


async def answer_file(args: argparse.Namespace, base_url: str) -> int:
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(base_url=root_of(base_url), headers=headers, timeout=args.timeout,
                                 limits=limits) as client:
        with opened(args.input, "rb") as source, opened(args.output, "w") as out:
            ok, failed = await run(read_lines(source), client, out, concurrency=args.max_concurrency,
                                   retries=args.retries, total=count_requests(args.input),
                                   progress=not args.no_progress)
    print(f"pad run-batch: {ok + failed} requests, {ok} answered, {failed} failed"
          + (f" (see their error in {args.output})" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Checked before a server starts: a wrong path is a clear error at once.
    if args.input != "-" and not Path(args.input).is_file():
        print(f"pad run-batch: no input file {args.input}", file=sys.stderr)
        return 2
    if args.input != "-" and args.output != "-" and Path(args.input).resolve() == Path(args.output).resolve():
        print("pad run-batch: the output would overwrite the input: name another file", file=sys.stderr)
        return 2
    if args.output != "-" and not Path(args.output).absolute().parent.is_dir():
        print(f"pad run-batch: no folder for the output {args.output}", file=sys.stderr)
        return 2
    try:
        if args.base_url:
            return asyncio.run(answer_file(args, args.base_url))
        from server.tools.local_server import local_server

        with local_server(args.serve_arg) as base_url:
            return asyncio.run(answer_file(args, base_url))
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"pad run-batch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
