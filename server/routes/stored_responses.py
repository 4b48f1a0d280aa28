"""Stored Responses API responses: what `store` keeps and what reads it.

A response whose request left `store` true (OpenAI's default) is kept for
PAD_RESPONSES_RETENTION_DAYS (30; 0 keeps none) with its conversation: the
earlier responses' (when it continued one), its own input, its answer.
- POST /v1/responses with `previous_response_id` continues that conversation
  (the new request's `instructions` and `preference` are its own: neither
  carries over, as OpenAI does not carry instructions over);
- GET /v1/responses/{id} is the response object as it was returned (a
  background one as it is now); with stream=true, a background response
  created with stream: true streams its events again, from
  starting_after + 1 (server/background_events.py);
- GET /v1/responses/{id}/input_items lists the request's own input items
  (OpenAI's cursor page: order, limit, after);
- DELETE /v1/responses/{id} forgets it;
- POST /v1/responses/{id}/cancel cancels a background response still
  running (server/background.py); for any other it is a 400.
A response of another user (an API key bound to users) is unknown to the
caller: not found, not said to exist.

A kept response's message and function-call items can be referenced: an
item's id names its response (msg_<hex> of resp_<hex>, and fc_<hex>_<n> for
its n-th call), so an `item_reference` to an earlier answer, which the
Vercel AI SDK sends for every assistant turn unless its `store` option is
false, resolves to that answer, and one to an earlier call (as Codex-style
clients send them, with the call's function_call_output after it) to that
call."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pad_core.validation import INT32_MAX
from server import background
from server.auth import Scope, key_scope
from server.auth_scopes import KeyScope
from server.background_events import replay
from server.errors import APIError, invalid
from server.generation import EventStream, streaming_response
from server.messages import response_input_messages
from server.openapi import SSE_EVENT, errors
from server.request_body import JSONRoute
from server.responses_models import ResponseObject
from server.store.records import StoredResponse, new_item_id

logger = logging.getLogger(__name__)

router = APIRouter(tags=["responses"], route_class=JSONRoute, dependencies=[Depends(key_scope)])


async def find_kept(store, scope: KeyScope | None, response_id: str) -> StoredResponse | None:
    """The kept response of that id that this key may read, else None."""
    if store is None or not store.keeps_responses:
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
    if background.is_running(kept.response):  # its answer is not in its conversation yet
        raise invalid(f"Previous response with id {response_id[:80]!r} is still {kept.response['status']}: "
                      "continue it once it is done", "previous_response_id", "previous_response_in_progress")
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
            item["id"] = new_item_id(kind)
        used.add(item["id"])
        out.append(item)
    return out


def message_parts(content: Any, assistant: bool) -> Any:
    """A message's content as OpenAI lists it: parts, an assistant's
    output_text parts with their (empty) annotations."""
    if isinstance(content, str):
        content = [{"type": "output_text" if assistant else "input_text", "text": content}]
    if not isinstance(content, list):
        return content
    return [{"annotations": [], **part} if isinstance(part, dict) and part.get("type") == "output_text" else part
            for part in content]


async def keep_response(store, response: dict[str, Any], *, user: str | None, history: list[dict[str, str]],
                        items: str | list[dict[str, Any]], previous: StoredResponse | None,
                        replace: bool = False, must: bool = False) -> None:
    """Keeps an answered response for previous_response_id and GET (with
    `replace`, a background response's later state). A store that fails is
    logged, never the answer's failure (as the feedback memory's record is
    not), unless keeping it is a `must` (a background response, which only
    a poll can read)."""
    try:
        output = response["output"]
        conversation = history + (response_input_messages(output, None) if output else [])
        names = {**(previous.call_names if previous else {}), **function_call_names(items),
                 **function_call_names(output)}
        await store.record_response(response, user=user, conversation=conversation, call_names=names,
                                    input_items=stored_input_items(items), replace=replace)
    except Exception:
        if must:
            raise
        logger.exception("could not keep response %s", response.get("id"))


# ---- item references -------------------------------------------------------
# message_item_id's and call_item_id's, of a resp_<uuid4 hex>: group 1 is the hex
OUTPUT_ITEM_ID = re.compile(r"(?:msg_([0-9a-f]{32}))|(?:fc_([0-9a-f]{32})_\d{1,6})")


def message_item_id(response_id: str) -> str:
    """A response's message item is named after the response, so that the
    feedback memory's record of the response (kept under its id) is the
    record of the item too."""
    return "msg_" + response_id.removeprefix("resp_")


def call_item_id(response_id: str, index: int) -> str:
    """A response's index-th function_call item, named after the response so
    that an item_reference to it finds the response that keeps it."""
    return f"fc_{response_id.removeprefix('resp_')}_{index}"


def is_item_reference(item: dict[str, Any]) -> bool:
    # OpenAI's ItemReference: {"type": "item_reference", "id"}; its type may be left out.
    return item.get("type") == "item_reference" or ("type" not in item and "role" not in item and "id" in item)


async def resolve_item_references(store, scope: KeyScope | None, items: str | list[dict[str, Any]],
                                  param: str = "input") -> str | list[dict[str, Any]]:
    """`input` with each item_reference replaced by the output item it names,
    an assistant message or a function call (404 when it is not kept)."""
    if isinstance(items, str):
        return items
    references = {index: item for index, item in enumerate(items) if is_item_reference(item)}
    if not references:
        return items
    for index, item in references.items():
        if not isinstance(item.get("id"), str) or not item["id"]:
            raise invalid(f"{param}[{index}].id must be the id of an item (a string)", f"{param}[{index}].id",
                          "invalid_value")
    kept = await kept_items(store, scope, [item["id"] for item in references.values()])
    resolved = list(items)
    for index, item in references.items():
        if item["id"] not in kept:
            raise item_not_found(store, item["id"], f"{param}[{index}].id")
        resolved[index] = kept[item["id"]]
    return resolved


async def kept_items(store, scope: KeyScope | None, item_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Output item id -> that item as an input item, for the message and
    function_call items of the responses kept (store not false, not
    deleted, within PAD_RESPONSES_RETENTION_DAYS) that the API key may read
    (another user's is left out, as unknown: it is not even said to exist)."""
    if store is None or not store.keeps_responses:
        return {}
    wanted: dict[str, set[str]] = {}  # response id -> the ids of its items referenced
    for item_id in item_ids:
        if match := OUTPUT_ITEM_ID.fullmatch(item_id):
            wanted.setdefault(f"resp_{match[1] or match[2]}", set()).add(item_id)
    found = {}
    for response_id, kept in (await store.find_responses(list(wanted))).items():
        if scope is not None and not scope.can_access(kept.user_id):
            continue
        for item in kept.response.get("output", ()):
            if item.get("id") in wanted[response_id] and (as_input := input_item_of(item)) is not None:
                found[item["id"]] = as_input
    return found


def input_item_of(item: dict[str, Any]) -> dict[str, Any] | None:
    """A kept output item as the input item that sends it again (None for a
    kind that cannot be referenced)."""
    if item.get("type") == "message":
        text = "".join(part.get("text", "") for part in item.get("content", ()))
        return {"id": item["id"], "type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
    if item.get("type") == "function_call":
        return {"id": item["id"], "type": "function_call", "call_id": item["call_id"], "name": item["name"],
                "arguments": item["arguments"]}
    return None


def item_not_found(store, item_id: str, param: str) -> APIError:
    """OpenAI's 404 for an item it does not keep, saying how to do without."""
    why = (f"only the message and function_call items of the responses this server keeps (store not false) can be referenced, "
           f"for {store.config.responses_retention_days:g} days" if store is not None and store.keeps_responses
           else "this server keeps no responses (PAD_RESPONSES_RETENTION_DAYS is 0)")
    return APIError(404, f"Item with id {item_id[:80]!r} not found: {why}. Send the item itself in input "
                    "(the Vercel AI SDK does with providerOptions.openai.store = false).",
                    "invalid_request_error", param, "item_not_found")


# ---- OpenAI's cursor pages (also the conversations' items and stored chat completions') ----
MAX_PAGE = 100


class ItemList(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


def page_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise invalid(f"limit must be between 1 and {MAX_PAGE}", "limit", "invalid_value")
    return limit


def item_list(items: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def cursor_page(items: list[dict[str, Any]], *, after: str | None, limit: int, descending: bool,
                kind: str, holder: str) -> dict[str, Any]:
    """A page of a list held whole: in order (or reversed), after the item
    `after` (a 400 when the `holder` holds no such `kind`), at most `limit`
    (checked by the route, before it reads the list)."""
    if descending:
        items = items[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise invalid(f"after: no {kind} {after[:80]!r} in {holder}", "after", "invalid_value")
        items = items[ids.index(after) + 1:]
    return item_list(items[:limit], len(items) > limit)


# ---- the routes -------------------------------------------------------------
async def kept_or_404(request: Request, scope: KeyScope | None, response_id: str) -> StoredResponse:
    """The kept response as it is now: a background one whose gateway
    stopped before it was done (its lease ran out) is failed first."""
    state = request.app.state
    store = getattr(state, "store", None)
    kept = await find_kept(store, scope, response_id)
    if kept is None:
        raise APIError(404, f"Response with id {response_id[:80]!r} not found: {not_kept_reason(store)}.",
                       "invalid_request_error", "response_id", "response_not_found")
    if background.is_running(kept.response) and not state.background_responses.runs_here(response_id):
        kept = await store.settle_abandoned_response(response_id, background.failed) or kept
    return kept


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses={
    **errors(400, 401, 404),
    200: {"model": ResponseObject, "description": "the response; with stream=true (a background response created "
          "with stream: true) a text/event-stream of its events after starting_after",
          "content": {"text/event-stream": {"schema": SSE_EVENT}}}})
async def retrieve_response(response_id: str, request: Request, scope: Scope,
                            stream: bool = False, include: Annotated[list[str] | None, Query()] = None,
                            starting_after: Annotated[int | None, Query(ge=-1)] = None,
                            include_obfuscation: bool | None = None):
    kept = await kept_or_404(request, scope, response_id)
    if stream:
        return await stream_again(request.app.state, kept, -1 if starting_after is None else starting_after)
    # as it was returned: not through ResponseObject, which would reorder its fields
    return JSONResponse(kept.response)


async def stream_again(state, kept: StoredResponse, after: int) -> EventStream:
    """A streamed background response's events after sequence number
    `after`: from this gateway's memory while it runs here, else from the
    store (following the run on another gateway until it is done)."""
    response_id = kept.response_id
    if not kept.response.get("background"):
        raise invalid("Only background responses created with stream: true can be streamed again; this one was "
                      "answered in its request", "stream", "invalid_value")
    log = state.background_responses.events(response_id)
    if log is not None:
        return streaming_response(log.follow(after))
    store = state.store
    if await store.last_response_event(response_id) is None:
        raise invalid("This background response was created without stream: true, so its events were not kept: "
                      "poll GET /v1/responses/{id} instead", "stream", "invalid_value")

    async def settled() -> dict[str, Any] | None:
        found = await store.settle_abandoned_response(response_id, background.failed)
        return found.response if found is not None else None

    return streaming_response(replay(store, response_id, min(after, INT32_MAX), settled))


@router.delete("/v1/responses/{response_id}", responses=errors(401, 404))
async def delete_response(response_id: str, request: Request, scope: Scope):
    kept = await kept_or_404(request, scope, response_id)
    if background.is_running(kept.response):  # a deleted response is no longer answered
        await stop_background(request.app.state, response_id)
    await request.app.state.store.delete_response(kept.response_id)
    return {"id": kept.response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, responses=errors(400, 401, 404))
async def cancel_response(response_id: str, request: Request, scope: Scope):
    """Cancels a background response still queued or in progress, and
    returns it as it is then (cancelled once its run has stopped: at once on
    this gateway, within a third of PAD_BACKGROUND_LEASE_S on another);
    cancelling a cancelled one again returns it unchanged."""
    kept = await kept_or_404(request, scope, response_id)
    if not kept.response.get("background"):
        raise invalid("Only responses created with background: true can be cancelled", "response_id")
    if background.is_running(kept.response):
        await stop_background(request.app.state, response_id)
        kept = await kept_or_404(request, scope, response_id)
    elif kept.response.get("status") != "cancelled":
        raise invalid(f"Cannot cancel a response that is already {kept.response.get('status')}", "response_id")
    return JSONResponse(kept.response)


async def stop_background(state, response_id: str) -> None:
    """Stops a background response's run: this gateway's at once; another
    gateway's is asked through the store, and waited for a while (its run
    reads the ask when it renews its lease)."""
    if await state.background_responses.cancel(response_id):
        return
    store = state.store
    if not await store.request_background_cancel(response_id):
        return  # no run holds it: a poll reads it failed
    deadline = time.monotonic() + state.settings.background_lease_s / 3 + 2.0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        kept = await store.find_response(response_id)
        if kept is None or not background.is_running(kept.response):
            return


@router.get("/v1/responses/{response_id}/input_items", responses=errors(400, 401, 404))
async def list_input_items(response_id: str, request: Request, scope: Scope,
                           after: str | None = None, limit: int = 20, order: Literal["asc", "desc"] = "desc",
                           include: Annotated[list[str] | None, Query()] = None):
    page_limit(limit)
    items = (await kept_or_404(request, scope, response_id)).input_items
    return cursor_page(items, after=after, limit=limit, descending=order == "desc", kind="input item",
                       holder="this response")
