"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with
the right status, for every failure the gateway can meet. One set of
handlers (`install_error_handlers`) serves every router, the store's too.

429 and 503 carry Retry-After; 401 carries WWW-Authenticate. Error bodies
are ASCII JSON: a message may quote what the client sent, and nothing it
quotes may fail the response."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from pad_core.errors import InvalidRequestError
from server.anthropic_errors import is_anthropic_scope, rewritten
from server.store.errors import StoreError

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying: a full queue drains in about
# a request's time; a worker (re)loading the model takes several seconds.
RETRY_AFTER_S = {429: 1, 503: 5}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.extra_headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.status in RETRY_AFTER_S:
            headers["Retry-After"] = str(RETRY_AFTER_S[self.status])
        return headers

    @classmethod
    def from_invalid(cls, exc: InvalidRequestError, rename: dict[str, str] | None = None) -> APIError:
        """A 400 from the validation on the request types (pad_core.types);
        `rename` maps their parameter names to the ones the client used."""
        return cls(400, exc.message, "invalid_request_error", exc.param, exc.code).renamed(rename)

    def renamed(self, rename: dict[str, str] | None) -> APIError:
        """This error with its parameter named as the client wrote it (the
        engine says messages / max_tokens / response_format for every route)."""
        param, message = self.param, self.message
        for ours, theirs in (rename or {}).items():
            if param is not None and (param == ours or param.startswith((f"{ours}.", f"{ours}["))):
                param = theirs + param[len(ours):] if theirs else None
                message = message.replace(ours, theirs or "the request", 1)
                break
        else:
            return self
        return APIError(self.status, message, self.type, param, self.code, self.extra_headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unavailable(message: str, code: str = "worker_unavailable") -> APIError:
    return APIError(503, message, "server_error", None, code)


class ErrorJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    return ErrorJSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _is_union_tag(part) -> bool:
    # pydantic names the union member it tried: "str", "list[WeightedPreference]"...
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool"} or "[" in part or "-" in part or part[:1].isupper()
    )


def _location(loc: tuple, keep_last: bool = False, body: Any = None) -> str | None:
    """The parameter an error is about, in the client's terms
    (messages[0].content), without pydantic's union tags; keep_last: the
    last element is a key the client sent (an unknown field), never a tag.
    With the client's `body`, a tagged union's tag (the "type" the client
    sent: response_format's "json_schema") is told from a field of the same
    name (response_format.json_schema.schema) by walking the body."""
    last = [str(loc[-1])] if keep_last and loc else []
    whole, loc = loc, (loc[:-1] if keep_last else loc)
    parts, node, tagged = [], body, None
    for index, part in enumerate(loc):
        if index == 0 and part in ("body", "query", "path", "header", "cookie"):
            continue  # FastAPI's source of the value; a body field may be named "path"
        if node is not tagged and _is_tag(node, part, whole[index + 1] if index + 1 < len(whole) else None):
            tagged = node
            continue
        held = (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int))
        if not held and _is_union_tag(part):
            continue  # the union member pydantic tried, not a key the client sent
        parts.append(str(part))
        node = _child(node, part) if held else None
    parts += last
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def _is_tag(node: Any, part: Any, following: Any) -> bool:
    """Whether `part` is the tag pydantic puts before a tagged union
    member's fields (the "type" or "role" the client sent) rather than a
    field of that name: a field is followed by its own keys, or by nothing."""
    if not isinstance(node, dict) or part not in (node.get("type"), node.get("role")):
        return False
    if part not in node:
        return True
    child = node[part]
    is_field = following is None or (isinstance(child, dict) and following in child) or (
        isinstance(child, list) and isinstance(following, int))
    return not is_field


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    return node[part] if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node) else None


def _specificity(error: dict) -> tuple[int, bool]:
    """For unions, the member that got furthest: the longest location, and
    of those one that took the value's type and failed a constraint (a list
    of 17 stop strings is "too long", not "not a string")."""
    return len(error.get("loc", ())), not str(error.get("type", "")).endswith("_type")


def _unknown_argument(error: dict, errors: list[dict], body: Any = None) -> APIError:
    """An unknown field, with a hint when a required one differs only in case
    ({"Model": 1} -> did you mean 'model'?)."""
    loc = tuple(error.get("loc", ()))
    param = _location(loc, keep_last=True, body=body)
    sent = str(loc[-1]) if loc else ""
    missing = [str(e["loc"][-1]) for e in errors
               if e.get("type") == "missing" and tuple(e.get("loc", ()))[:-1] == loc[:-1] and e.get("loc")]
    hint = next((f" (did you mean '{name}'?)" for name in missing if name.lower() == sent.lower()), "")
    return invalid(f"Unrecognized request argument supplied: {param}{hint}", param, "unknown_parameter")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if unknown is not None:  # as OpenAI: an unknown argument is named first
        return error_response(_unknown_argument(unknown, errors, exc.body))
    # The most specific error: for unions, the member that got furthest.
    first = max(errors, key=_specificity, default={})
    param = _location(tuple(first.get("loc", ())), body=exc.body)
    if first.get("type") == "json_invalid":
        return error_response(invalid("The request body is not valid JSON.", None, "invalid_json"))
    if first.get("type") == "missing" and param is None:
        return error_response(invalid("The request body is required (a JSON object).", None, "missing_body"))
    if param is None and first.get("type") == "model_attributes_type":  # [], 5, or a body not sent as JSON
        sent = (f"Content-Type {request.headers.get('content-type', '')[:60]!r}"
                if isinstance(first.get("input"), bytes) else "JSON that is not an object")
        return error_response(invalid(f"The request body must be a JSON object sent as Content-Type "
                                      f"application/json, not {sent}.", None, "invalid_json"))
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    kind = str(first.get("type", ""))
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "missing_required_parameter" \
        if kind == "missing" else "invalid_value"  # OpenAI's codes for these
    return error_response(invalid(message, param, code))


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
    return error_response(APIError(exc.status, exc.message, exc.type, exc.param, exc.code))


async def _invalid_request(_: Request, exc: InvalidRequestError) -> JSONResponse:
    return error_response(APIError.from_invalid(exc))


def _allowed_methods(request: Request) -> str:
    """Every method of the request's path (Starlette's 405 names only the
    first route's, and each method here is a route of its own)."""
    matching = [route for route in _leaf_routes(request.app.router.routes)
                if route.matches(request.scope)[0] != Match.NONE]
    # A path of its own (/v1/responses/input_tokens) is a resource of its own, not one id of
    # /v1/responses/{response_id}: its methods alone.
    static = [route for route in matching if not getattr(route, "param_convertors", None)]
    methods = {method for route in static or matching for method in getattr(route, "methods", None) or ()}
    return ", ".join(sorted(methods))


def _leaf_routes(routes):
    """The routes themselves: FastAPI (0.16x) keeps an included router as one
    entry (`original_router`) that matches for all of its routes, with no
    methods of its own. The routers are included without a prefix."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


def served_routes(request: Request) -> list[str]:
    """'METHOD /path' of every API route (the OpenAPI document's, so no docs pages)."""
    paths = request.app.openapi().get("paths", {})
    return [f"{method.upper()} {path}" for path, operations in paths.items() if path.startswith("/v1/")
            for method in operations]


def _matches_a_route(request: Request) -> bool:
    return any(route.matches(request.scope)[0] != Match.NONE for route in request.app.router.routes)


def _only_templates_match(request: Request) -> bool:
    """Whether the routes a path matches (for another method) all take a
    path parameter: POST /v1/responses/compact is not a method missing from
    GET /v1/responses/{response_id} but an endpoint this server lacks."""
    matching = [route for route in _leaf_routes(request.app.router.routes)
                if route.matches(request.scope)[0] != Match.NONE]
    return bool(matching) and all(getattr(route, "param_convertors", None) for route in matching)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    error = getattr(exc, "error", None)  # request_body.BodyError
    if isinstance(error, APIError):
        return error_response(error)
    if request.url.path.startswith("/v1/") and (
            (exc.status_code == 404 and not _matches_a_route(request))
            or (exc.status_code == 405 and _only_templates_match(request))):
        message = (f"Unknown endpoint: {request.method} {request.url.path}. This server serves "
                   f"{', '.join(served_routes(request))}.")
        return error_response(APIError(404, message, "invalid_request_error", None, "unknown_url"))
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return error_response(APIError(exc.status_code, str(exc.detail), kind, headers=headers))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette answers this from its outermost layer, outside
    # RequestIdMiddleware: the id is put on the response here.
    request_id = getattr(request.state, "request_id", None)
    logger.exception("unhandled error in %s %s (request %s)", request.method, request.url.path, request_id)
    response = error_response(APIError(500, "internal server error", "server_error"))
    if is_anthropic_scope(request.scope):  # (answered outside AnthropicErrorsMiddleware too: rewritten here)
        response = ErrorJSONResponse(json.loads(rewritten(500, response.body)), status_code=500)
    if request_id is not None:  # (as RequestIdMiddleware names it; imported from there, it would import this)
        response.headers["x-request-id"] = response.headers["request-id"] = request_id
    return response


# The routes whose answers pad_requests_total counts (server/generation.py's `serve`).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})


def is_generation_path(scope) -> bool:
    """The matched route's path (FastAPI puts the route on the scope), else
    the request's path below the app's root_path (before routing: the body
    limit's 413)."""
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "").removeprefix(scope.get("root_path", ""))
    return path in GENERATION_PATHS


def count_request(request: Request, status: int | str) -> None:
    """Counts a generation request's status once: `serve` counts what the
    route answers; a request refused before the route ran (its key, its
    body's types, unknown parameters, bad JSON) is counted by the error
    handler that answers it."""
    if not is_generation_path(request.scope) or getattr(request.state, "counted", False):
        return
    request.state.counted = True
    request.app.state.metrics.requests.labels(status=str(status)).inc()


def _counting(handler):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response = await handler(request, exc)
        count_request(request, response.status_code)
        return response

    return handle


def install_error_handlers(app: FastAPI) -> None:
    for kind, handler in ((RequestValidationError, _validation_error), (APIError, _api_error),
                          (StoreError, _store_error), (InvalidRequestError, _invalid_request),
                          (HTTPException, _http_error), (Exception, _unexpected)):
        app.add_exception_handler(kind, _counting(handler))
