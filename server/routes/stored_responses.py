"""Stored Responses API responses: what `store` keeps and what reads it.

A response whose request left `store` true (OpenAI's default) is kept for
PAD_RESPONSES_RETENTION_DAYS (30; 0 keeps none) with its conversation: the
earlier responses' (when it continued one), its own input, its answer.
- POST /v1/responses with `previous_response_id` continues that conversation
  (the new request's `instructions` and `preference` are its own: neither
  carries over, as OpenAI does not carry instructions over);
- GET /v1/responses/{id} is the response object as it was returned;
- GET /v1/responses/{id}/input_items lists the request's own input items
  (OpenAI's cursor page: order, limit, after);
- DELETE /v1/responses/{id} forgets it;
- POST /v1/responses/{id}/cancel is a 400: only background responses can be
  cancelled, and there are none here.
A response of another user (an API key bound to users) is unknown to the
caller: not found, not said to exist."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from server.auth import Scope, key_scope
from server.auth_scopes import KeyScope
from server.errors import APIError, invalid
from server.messages import response_input_messages
from server.openapi import errors
from server.request_body import JSONRoute
from server.responses_models import ResponseObject
from server.store import schema
from server.store.repository import StoredResponse

logger = logging.getLogger(__name__)

router = APIRouter(tags=["responses"], route_class=JSONRoute, dependencies=[Depends(key_scope)])
MAX_ID_CHARS = schema.responses.c.response_id.type.length


async def find_kept(store, scope: KeyScope | None, response_id: str) -> StoredResponse | None:
    """The kept response of that id that this key may read, else None."""
    if store is None or not store.keeps_responses or not response_id or len(response_id) > MAX_ID_CHARS:
        return None
    kept = await store.find_response(response_id)
    if kept is None or (scope is not None and not scope.can_access(kept.user_id)):
        return None
    return kept


def not_kept_reason(store) -> str:
    if store is None or not store.keeps_responses:
        return "this server keeps no responses (PAD_RESPONSES_RETENTION_DAYS is 0)"
    return (f"responses are kept for {store.config.responses_retention_days:g} days when their request's store "
            "is not false, and only for the API key's own users")


async def previous_response(store, scope: KeyScope | None, response_id: str | None) -> StoredResponse | None:
    """The response a request continues (`previous_response_id`), or OpenAI's
    400 previous_response_not_found."""
    if response_id is None:
        return None
    kept = await find_kept(store, scope, response_id)
    if kept is None:
        raise APIError(400, f"Previous response with id {response_id[:80]!r} not found: {not_kept_reason(store)}. "
                       "Send the whole conversation in input instead.", "invalid_request_error",
                       "previous_response_id", "previous_response_not_found")
    return kept


def function_call_names(items: str | list[dict[str, Any]]) -> dict[str, str]:
    """call_id -> function name of the function_call items among `items`."""
    if isinstance(items, str):
        return {}
    return {item["call_id"]: item["name"] for item in items
            if item.get("type") == "function_call" and isinstance(item.get("call_id"), str)
            and isinstance(item.get("name"), str)}


def stored_input_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as items in the shape OpenAI lists them: each with
    an id of its own (the client's, unless another item has it already: a
    page of them continues after an id), a message's text content as
    parts, a status."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    out, used = [], set()
    for item in items:
        kind = item.get("type", "message")
        item = {**item, "type": kind}
        if kind == "message":
            item["content"] = message_parts(item.get("content"), assistant=item.get("role") == "assistant")
        if kind in ("message", "function_call", "function_call_output"):
            item["status"] = item.get("status") or "completed"
        if not item.get("id") or item["id"] in used:
            item["id"] = new_item_id(ITEM_ID_PREFIXES.get(kind, "item"))
        used.add(item["id"])
        out.append(item)
    return out


ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def message_parts(content: Any, assistant: bool) -> Any:
    """A message's content as OpenAI lists it: parts, an assistant's
    output_text parts with their (empty) annotations."""
    if isinstance(content, str):
        content = [{"type": "output_text" if assistant else "input_text", "text": content}]
    if not isinstance(content, list):
        return content
    return [{"annotations": [], **part} if isinstance(part, dict) and part.get("type") == "output_text" else part
            for part in content]


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


async def keep_response(store, response: dict[str, Any], *, user: str | None, history: list[dict[str, str]],
                        items: str | list[dict[str, Any]], previous: StoredResponse | None) -> None:
    """Keeps an answered response for previous_response_id and GET. A store
    that fails is logged, never the answer's failure (as the feedback
    memory's record is not)."""
    try:
        output = response["output"]
        conversation = history + (response_input_messages(output, None) if output else [])
        names = {**(previous.call_names if previous else {}), **function_call_names(items),
                 **function_call_names(output)}
        await store.record_response(response, user=user, conversation=conversation, call_names=names,
                                    input_items=stored_input_items(items))
    except Exception:
        logger.exception("could not keep response %s", response.get("id"))


# ---- the routes -------------------------------------------------------------
async def kept_or_404(request: Request, scope: KeyScope | None, response_id: str) -> StoredResponse:
    store = getattr(request.app.state, "store", None)
    kept = await find_kept(store, scope, response_id)
    if kept is None:
        raise APIError(404, f"Response with id {response_id[:80]!r} not found: {not_kept_reason(store)}.",
                       "invalid_request_error", "response_id", "response_not_found")
    return kept


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=errors(400, 401, 404))
async def retrieve_response(response_id: str, request: Request, scope: Scope,
                            stream: bool = False, include: Annotated[list[str] | None, Query()] = None,
                            starting_after: int | None = None, include_obfuscation: bool | None = None):
    if stream:  # OpenAI replays the events of a background response only
        raise invalid("stream is only for background responses, which this server does not run", "stream",
                      "unsupported_parameter")
    # as it was returned: not through ResponseObject, which would reorder its fields
    return JSONResponse((await kept_or_404(request, scope, response_id)).response)


@router.delete("/v1/responses/{response_id}", responses=errors(401, 404))
async def delete_response(response_id: str, request: Request, scope: Scope):
    kept = await kept_or_404(request, scope, response_id)
    await request.app.state.store.delete_response(kept.response_id)
    return {"id": kept.response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel", responses=errors(400, 401, 404))
async def cancel_response(response_id: str, request: Request, scope: Scope):
    await kept_or_404(request, scope, response_id)
    raise invalid("Only responses created with background: true can be cancelled; this one has finished",
                  "response_id")


@router.get("/v1/responses/{response_id}/input_items", responses=errors(400, 401, 404))
async def list_input_items(response_id: str, request: Request, scope: Scope,
                           after: str | None = None, limit: int = 20, order: Literal["asc", "desc"] = "desc",
                           include: Annotated[list[str] | None, Query()] = None):
    if not 1 <= limit <= 100:
        raise invalid("limit must be between 1 and 100", "limit", "invalid_value")
    items = (await kept_or_404(request, scope, response_id)).input_items
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise invalid(f"after: no input item {after[:80]!r} in this response", "after", "invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
