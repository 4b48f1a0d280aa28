"""Anthropic's error shape on the Anthropic routes (/v1/messages...):
`{"type": "error", "error": {"type": ..., "message": ...}}`, whose `type`
Anthropic's SDKs read, in place of OpenAI's `{"error": {"message", "type",
"param", "code"}}` that every other route answers.

A pure ASGI middleware rewrites the JSON error bodies of those routes,
whoever wrote them: the key check's 401, validation's 400, a route's own
errors, the body limit's 413 (it runs outside that limit). Streams are
untouched: their errors are Anthropic `error` events already
(server/routes/messages.py)."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PATH_PREFIX = "/v1/messages"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """An Anthropic route's error body (the OpenAPI document's shape of it)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


def is_anthropic_scope(scope: Scope) -> bool:
    """Whether a request is for an Anthropic route (its path below the app's root_path)."""
    path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
    return path == PATH_PREFIX or path.startswith(PATH_PREFIX + "/")


def anthropic_error(status: int, message: str) -> dict:
    """The `error` object of an HTTP status (Anthropic's types by status)."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": kind, "message": message}


def rewritten(status: int, body: bytes) -> bytes | None:
    """An OpenAI error body in Anthropic's shape (None: not one)."""
    try:
        sent = json.loads(body)
    except ValueError:
        return None
    error = sent.get("error") if isinstance(sent, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    return json.dumps({"type": "error", "error": anthropic_error(status, error["message"])},
                      ensure_ascii=True, separators=(",", ":")).encode("ascii")


class AnthropicErrorsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_anthropic_scope(scope):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # an error's response start, sent once its body is rewritten
        chunks: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or ())
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                body = rewritten(held["status"], body) or body
                headers = [(k, v) for k, v in held.get("headers") or () if k != b"content-length"]
                await send({**held, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, rewriting_send)
