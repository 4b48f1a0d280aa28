"""Amazon SageMaker's serving contract, as vLLM serves it: POST /invocations
takes any generation request and answers it as the endpoint its body is
for; GET or POST /ping is the health probe (server/routes/models.py).

Which endpoint: a body with `messages` is a chat completion, one with
`input` a Responses request, one with `prompt` a completion. The request
then goes through that endpoint exactly as if sent there (its key, its
validation, its errors, its stream, its metrics): this middleware only
rewrites the path. It sits inside BodyLimitMiddleware, so the body it reads
is bounded and already whole."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response, invalid
from server.request_body import PARSE_IN_THREAD_BYTES, replayed_receive

PATH = "/invocations"
# The field that names a body's endpoint, in the order they are looked for: `input` before
# `prompt`, which a Responses request may carry too (a stored prompt's, refused or null).
TARGETS = (("messages", "/v1/chat/completions"), ("input", "/v1/responses"), ("prompt", "/v1/completions"))


def invocation_target(body: Any) -> str | None:
    """The endpoint a parsed body is for; None when it names none. A body
    that is not a JSON object goes to chat completions, whose parser says
    what is wrong with it."""
    if not isinstance(body, dict):
        return TARGETS[0][1]
    return next((path for field, path in TARGETS if body.get(field) is not None), None)


async def _parsed(raw: bytes) -> Any:
    try:
        if len(raw) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(json.loads, raw)
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


class InvocationsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].removeprefix(root) != PATH:
            await self.app(scope, receive, send)
            return
        first = await receive()  # the whole body, as BodyLimitMiddleware replays it
        replayed = replayed_receive([], first, receive)
        if first["type"] != "http.request":  # the client left
            await self.app(scope, replayed, send)
            return
        target = invocation_target(await _parsed(first.get("body", b"")))
        if target is None:
            fields = ", ".join(f"`{field}` ({path})" for field, path in TARGETS)
            scope["app"].state.metrics.requests.labels(status="400").inc()  # a generation request, refused
            await error_response(invalid(f"/invocations takes a generation request: a body with {fields}",
                                         None))(scope, replayed, send)
            return
        path = root + target
        await self.app({**scope, "path": path, "raw_path": path.encode()}, replayed, send)
