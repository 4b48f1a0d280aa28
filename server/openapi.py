"""The OpenAPI document states what the server really does: the error
statuses of each route (OpenAI-shaped bodies, never FastAPI's 422), and the
media types it sends (SSE for a streamed chat, Prometheus text for
/metrics), so a schema fuzzer run against /openapi.json finds no false
mismatches."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.openai_models import ErrorResponse

DESCRIPTIONS = {
    400: "Invalid request (OpenAI-shaped error naming the parameter)",
    401: "Missing or wrong API key (when keys are configured)",
    403: "The API key is bound to other users, or is not an admin key",
    404: "Unknown model, user profile, completion or referenced input item",
    413: "The request body is larger than PAD_MAX_REQUEST_BYTES",
    429: "max_queue requests are in flight; retry after Retry-After seconds",
    503: "The worker is loading or down (or the store is unavailable); retry after Retry-After seconds",
}
REQUEST_ID_HEADER = {"x-request-id": {
    "description": "the request's id: the client's X-Request-Id if it sent a plain token, else req_<hex>",
    "schema": {"type": "string"}}}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def errors(*statuses: int, body: type = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: these statuses, each with the error `body`
    (OpenAI's; the Anthropic routes' their own)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": body, "description": DESCRIPTIONS[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER_HEADER
    return out


# One server-sent event (OpenAPI 3.2's reading of an event stream's schema).
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string", "description": "a chunk or event (JSON), an OpenAI-shaped error (JSON) or [DONE]"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def generation_responses(model: type, description: str, error_body: type = ErrorResponse
                         ) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a generating route: its errors, and a 200 that is
    `model` as JSON or, with stream: true, a text/event-stream."""
    return {
        **errors(400, 401, 403, 404, 413, 429, 503, body=error_body),
        200: {"model": model, "description": description,
              "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    }


def install_openapi(app: FastAPI, max_top_k: int | None = None) -> None:
    """app.openapi() without FastAPI's 422 (this server answers 400), and
    with the bounds this server's settings set (pad.top_k's max_top_k)
    where the request models can only say int64."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
                    for response in operation.get("responses", {}).values():
                        response.setdefault("headers", {}).update(REQUEST_ID_HEADER)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            pad_top_k = components.get("PadOptions", {}).get("properties", {}).get("top_k", {})
            for member in pad_top_k.get("anyOf", [pad_top_k]):
                if max_top_k is not None and "maximum" in member:
                    member["maximum"] = max_top_k
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
