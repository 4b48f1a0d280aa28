"""API keys as FastAPI dependencies: the one place a request gets a 401.

Every router that needs a key declares `Depends(key_scope)` (the chat,
models, users, feedback and reward-model routes); /health, /metrics and the
docs do not. Routes read the caller's scope from the same dependency
(FastAPI runs it once per request)."""

from __future__ import annotations

import urllib.parse
from typing import Annotated

from fastapi import Depends, Request

from server.auth_scopes import KeyScope, KeyTable, bearer_token, check_user
from server.errors import APIError, invalid


def key_scope(request: Request) -> KeyScope | None:
    """The caller's key scope; None when no keys are configured (no auth).
    A missing or unknown key (`Authorization: Bearer KEY` or `api-key: KEY`)
    is a 401."""
    table: KeyTable | None = getattr(request.app.state, "key_table", None)
    if table is None or not table.enabled:
        return None
    if INTERNAL_SCOPE in request.scope:  # a batch's request, made in this process for its creator
        return request.scope[INTERNAL_SCOPE]
    # Bearer (OpenAI's SDKs), api-key (Azure's), x-api-key (Anthropic's)
    token = (bearer_token(request.headers.get("authorization")) or request.headers.get("api-key")
             or request.headers.get("x-api-key"))
    scope = table.authenticate(token)
    if scope is None:
        message = "Incorrect API key provided." if token else "You didn't provide an API key."
        raise APIError(401, message, "invalid_request_error", None, "invalid_api_key")
    return scope


Scope = Annotated[KeyScope | None, Depends(key_scope)]

# The ASGI scope key under which a request made inside this process (a
# batch's, server/batches.py) carries the scope of the key that created it.
# No request from the network can set it: the server builds their ASGI scope.
INTERNAL_SCOPE = "pad.key_scope"


def path_user_id(request: Request, user_id: str, scope: Scope) -> str:
    """The {user_id} of the path, as the client sent it, and one this key may
    touch (403 otherwise). Bytes that are not UTF-8 are a 400: decoded with
    replacement, "%FF" and "%FE" would both be the user "\\ufffd"."""
    if "\ufffd" in user_id:
        raw = request.scope.get("raw_path")
        try:
            if raw is not None:
                urllib.parse.unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("the user id in the path is not valid UTF-8", "user_id", "invalid_text") from None
    check_user(scope, user_id)
    return user_id


UserId = Annotated[str, Depends(path_user_id)]
