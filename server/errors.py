"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with
the right status, for every failure the gateway can meet."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.store.errors import StoreError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unavailable(message: str, code: str = "worker_unavailable") -> APIError:
    return APIError(503, message, "server_error", None, code)


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _is_union_tag(part) -> bool:
    # pydantic names the union member it tried: "str", "list[WeightedPreference]"...
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool"} or "[" in part or "-" in part or part[:1].isupper()
    )


def _location(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path") and not _is_union_tag(p)]
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # The most specific error: for unions, the member that got furthest.
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
    param = _location(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
        return error_response(invalid(message, param, "unknown_parameter"))
    if first.get("type") == "json_invalid":
        return error_response(invalid("The request body is not valid JSON.", None, "invalid_json"))
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return error_response(invalid(message, param))


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(APIError(exc.status_code, str(exc.detail), kind))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return error_response(APIError(500, "internal server error", "server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
