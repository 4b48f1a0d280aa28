"""HTTP glue shared by the users and feedback routers: OpenAI-shaped error
responses, the store and the caller's key scope from the request."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from server.auth_scopes import KeyScope, KeyTable, bearer_token
from server.store.errors import StoreError

logger = logging.getLogger(__name__)


class HTTPStoreError(StoreError):
    def __init__(self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type


def error_response(exc: StoreError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.to_openai(), status_code=exc.status, headers=headers)


def get_store(request: Request):
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise HTTPStoreError(503, "preference storage is not available", type="server_error", code="store_unavailable")
    return store


def request_scope(request: Request) -> KeyScope | None:
    """The caller's key scope. The gateway's auth sets `request.state.key_scope`
    (None when auth is off); without it, the key table on `app.state.key_table`
    is consulted here (standalone use of these routers)."""
    if hasattr(request.state, "key_scope"):
        return request.state.key_scope
    table: KeyTable | None = getattr(request.app.state, "key_table", None)
    if table is None or not table.enabled:
        return None
    token = bearer_token(request.headers.get("authorization")) or request.headers.get("api-key")
    scope = table.authenticate(token)
    if scope is None:
        raise HTTPStoreError(
            401,
            "missing API key" if not token else "incorrect API key provided",
            type="invalid_request_error",
            code="invalid_api_key",
        )
    return scope


async def json_object(request: Request, allowed: set[str]) -> dict[str, Any]:
    """The body as a JSON object with only `allowed` keys (400 otherwise)."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPStoreError(400, f"the body is not valid JSON: {exc}", type="invalid_request_error") from None
    if not isinstance(body, dict):
        raise HTTPStoreError(400, "the body must be a JSON object", type="invalid_request_error")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HTTPStoreError(
            400,
            f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})",
            type="invalid_request_error",
            param=unknown[0],
            code="unknown_parameter",
        )
    return body


async def handle(call: Callable[[], Awaitable[Any]]) -> Any:
    """Runs a route body; store errors become OpenAI-shaped responses."""
    try:
        result = await call()
    except StoreError as exc:
        return error_response(exc)
    return JSONResponse(result) if isinstance(result, dict) else result
