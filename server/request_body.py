"""What the gateway accepts as a request body, before any route sees it.

- `BodyLimitMiddleware`: a body larger than `max_request_bytes` is a 413,
  refused from its Content-Length (or as soon as a chunked body passes the
  limit). Nothing downstream ever holds more. The rest of the body is read
  and dropped first (up to DRAIN_BYTES, for DRAIN_S, while it keeps
  coming), as nginx's lingering close does: a server that closes with a
  body still arriving makes the kernel reset the connection, and an SDK
  that sent the whole body read "connection reset" instead of the 413. A
  client that announced a body and sends none (or sent `Expect:
  100-continue`) is answered after DRAIN_IDLE_S (at once).
- `parse_json`: strict JSON (UTF-8, no NaN/Infinity, finite numbers), nested
  at most MAX_JSON_DEPTH deep, with no lone surrogate ("\\ud800") in any
  string or key: such text cannot be encoded as UTF-8, so it would fail the
  IPC, the tokenizer or the database later, as a 500.
- `JSONRoute`: the route class of every router, so FastAPI's body parsing
  goes through `parse_json` and its errors are OpenAI-shaped 400s.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pad_core.validation import is_valid_unicode
from server.errors import APIError, error_response, invalid, is_generation_path

# A chat request nests 5 deep (body > messages > [i] > content > [j]); 32
# leaves room for any legitimate client and none for a stack-busting one.
MAX_JSON_DEPTH = 32
# Keys of one object: a request has ~40 fields; 200,000 unknown ones would
# cost pydantic a second of the event loop to list.
MAX_JSON_KEYS = 1000
# A refused body is read and dropped up to this much, for at most this long,
# before the 413 (see the module's docstring); a bigger or slower one is cut.
DRAIN_BYTES = 32 * 2**20
DRAIN_S = 5.0
DRAIN_IDLE_S = 0.5  # no more of it for this long: the client is waiting for the answer
# Bodies larger than this are parsed in a thread, beside the event loop.
PARSE_IN_THREAD_BYTES = 256 * 1024

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or the reverse
# (an escape is real when an even number of backslashes precedes it).
_LONE_SURROGATE = re.compile(
    rb"(?:^|[^\\])(?:\\\\)*(?:"
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)


class BodyError(HTTPException):
    """An unacceptable body, raised inside FastAPI's body parsing (which
    lets only HTTPException through); the error handler answers `error`."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message)
        self.error = error


# Bodies that are a whole batch's input: a file upload, and an Anthropic Message Batch (its requests inline).
UPLOAD_PATHS = ("/v1/files", "/v1/messages/batches")


def too_large(limit: int, setting: str = "PAD_MAX_REQUEST_BYTES") -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                         f"({setting}).", "invalid_request_error", None, "request_too_large")


class BodyLimitMiddleware:
    """Pure ASGI: buffers the body up to `limit` bytes and replays it to the
    app; past the limit, answers 413 without reading the rest."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int | None = None):
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit if upload_limit is not None else limit  # POST to UPLOAD_PATHS

    def limit_of(self, scope: Scope) -> int:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        return self.upload_limit if scope.get("method") == "POST" and path in UPLOAD_PATHS else self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
            await self._refuse(scope, receive, send, body_started=False)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                await self.app(scope, replayed_receive([], message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, body_started=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replayed_receive(chunks, None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, body_started: bool) -> None:
        # A client waiting for "100 Continue" has sent nothing, unless reading began (which sent it).
        waits = dict(scope.get("headers") or ()).get(b"expect", b"").lower() == b"100-continue"
        if body_started or not waits:
            await drain(receive)
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if is_generation_path(scope) or path == "/invocations":  # refused before any handler: counted here
            scope["app"].state.metrics.requests.labels(status="413").inc()
        limit = self.limit_of(scope)
        response = error_response(too_large(limit, "PAD_MAX_FILE_BYTES" if limit != self.limit else
                                            "PAD_MAX_REQUEST_BYTES"))
        response.headers["Connection"] = "close"  # the unread rest of the body must not be parsed as a request
        await response(scope, receive, send)


async def drain(receive: Receive) -> int:
    """Reads and drops the rest of a request's body: until its end, the
    client leaving or pausing (DRAIN_IDLE_S), DRAIN_BYTES or DRAIN_S.
    Returns the bytes dropped."""
    # One deadline checked every pass: on Python 3.11 an outer asyncio.timeout
    # around wait_for can be lost when a chunk and the deadline coincide.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_S
    dropped = 0
    while dropped <= DRAIN_BYTES:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            message = await asyncio.wait_for(receive(), min(DRAIN_IDLE_S, left))
        except TimeoutError:
            break
        if message["type"] != "http.request":
            break
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return dropped


def replayed_receive(chunks: list[bytes], first: Message | None, receive: Receive) -> Receive:
    """A receive that gives the buffered body as one message, then defers to
    the real one (the chat route listens there for the client leaving)."""
    pending: list[Message] = [first] if first is not None else [
        {"type": "http.request", "body": b"".join(chunks), "more_body": False}
    ]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


class _Oversized(dict):
    """An object of more than MAX_JSON_KEYS keys, kept (not refused in the
    parser) so the 400 can name where it sits (`logit_bias`, say)."""


def _bounded_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return _Oversized(pairs) if len(pairs) > MAX_JSON_KEYS else dict(pairs)


def _has_oversized(raw: bytes) -> bool:
    """Cheap pre-check: an object can have more than MAX_JSON_KEYS keys only
    if the body has more key separators than that."""
    return raw.count(b":") > MAX_JSON_KEYS


def _oversized_path(value: Any) -> tuple[str, int] | None:
    """(where, keys) of the first object with too many keys ("" for the body itself), or None."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Oversized):
            return path, len(node)
        if isinstance(node, dict):
            stack += [(child, f"{path}.{key}" if path else str(key)) for key, child in reversed(node.items())]
        elif isinstance(node, list):
            stack += [(child, f"{path}[{index}]") for index, child in reversed(list(enumerate(node)))]
    return None


def parse_json(raw: bytes) -> Any:
    """The body as JSON; an OpenAI-shaped 400 (APIError) for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"The request body is not valid UTF-8 (byte {exc.start}).", None, "invalid_json") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_bounded_object)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # JSONDecodeError, NaN, huge numbers, > 4300-digit integers
        raise invalid(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None
    if _nested_deeper_than(raw, MAX_JSON_DEPTH):
        raise _too_deep()
    if _has_oversized(raw) and (oversized := _oversized_path(value)) is not None:
        where, keys = oversized
        raise invalid(f"{where or 'The request body'} has {keys} keys, at most {MAX_JSON_KEYS} allowed in one "
                      "object.", where or None, "too_many_keys")
    if _LONE_SURROGATE.search(raw):
        _refuse_lone_surrogate(value)
    return value


def _too_deep() -> APIError:
    return invalid(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.", None, "invalid_json")


def _nested_deeper_than(raw: bytes, limit: int) -> bool:
    """On valid JSON, at C speed: strip the strings, keep the brackets, and
    remove innermost pairs once per level."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    return bool(brackets)


def _refuse_lone_surrogate(value: Any) -> None:
    """Finds the string (or key) holding a lone surrogate, to name it."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if not is_valid_unicode(node):
                raise invalid(f"{path or 'the body'} is not valid Unicode (a lone surrogate)", path or None,
                              "invalid_text")
            continue
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if isinstance(key, str) and not is_valid_unicode(key):
                raise invalid("a key of the body is not valid Unicode (a lone surrogate)", None, "invalid_text")
            if isinstance(child, str | dict | list):
                stack.append((child, f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)))


class JSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            try:
                if len(raw) > PARSE_IN_THREAD_BYTES:  # the loop keeps serving (json.loads lets go of the GIL in slices)
                    self._json = await asyncio.to_thread(parse_json, raw)
                else:
                    self._json = parse_json(raw)
            except APIError as error:
                raise BodyError(error) from None
        return self._json


class JSONRoute(APIRoute):
    """Routes whose JSON bodies are parsed by `parse_json`; a body sent with
    no Content-Type is taken as JSON (newer FastAPI would leave it unparsed)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            scope = request.scope
            if not any(name == b"content-type" for name, _ in scope.get("headers") or ()):
                scope = {**scope, "headers": [*scope.get("headers", ()), (b"content-type", b"application/json")]}
            return await handler(JSONRequest(scope, request.receive))

        return route
