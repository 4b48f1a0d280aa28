"""`x-request-id` on every response, as OpenAI sends it (and the same id as
`request-id`, Anthropic's header).

Clients read it to tie a failure to the server's logs: the Python SDK's
`response._request_id` and `error.request_id`, the JS SDK's
`error.requestID`, LiteLLM's logging. A client (or a proxy in front) that
sends its own `X-Request-Id` gets that id back, as vLLM does, so one id can
follow a request through several services; anything else is given a fresh
`req_<hex>`. The id is also on the request's state (`request.state
.request_id`) and in the log line of an unhandled error."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import invalid

HEADER = b"x-request-id"
ANTHROPIC_HEADER = b"request-id"  # the same id where Anthropic's SDKs read it (the Messages API's clients)
# A client's id is echoed only if it is a plain token: it goes into a
# response header and a log line, so no spaces, quotes or control characters.
CLIENT_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id_of(scope: Scope) -> str:
    """The client's `X-Request-Id` if it is a plain token, else a new id."""
    sent = client_header_id(scope)
    return sent if sent is not None else f"req_{uuid.uuid4().hex}"


def client_header_id(scope: Scope) -> str | None:
    sent = dict(scope.get("headers") or ()).get(HEADER)
    if sent is not None and CLIENT_ID.fullmatch(sent):
        return sent.decode("ascii")
    return None


def adopt_body_request_id(request, body_id: str | None) -> None:
    """vLLM's `request_id` body field: the request's id (logs, the
    x-request-id header) unless an X-Request-Id header gave one, as vLLM
    has it. A plain token only, as the header's; else a 400."""
    if body_id is None:
        return
    if not CLIENT_ID.fullmatch(body_id.encode("utf-8")):
        raise invalid("request_id must be 1-128 letters, digits or . _ : -", "request_id", "invalid_value")
    if client_header_id(request.scope) is None:
        request.state.request_id = body_id


class RequestIdMiddleware:
    """Pure ASGI (streams pass through untouched): adds the header to the
    response's start message, whatever answers it (a route, an error
    handler, the body limit)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = request_id_of(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":  # read now: a body's request_id may have replaced it
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in (HEADER, ANTHROPIC_HEADER)]
                value = state["request_id"].encode("ascii")
                message = {**message, "headers": [*headers, (HEADER, value), (ANTHROPIC_HEADER, value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
