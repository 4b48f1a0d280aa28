"""Stored chat completions: what `store: true` on /v1/chat/completions keeps
and what reads it (OpenAI's `client.chat.completions.list / retrieve /
update / delete / messages.list`).

A chat completion whose request set `store: true` (OpenAI's default is
false) is kept for PAD_CHAT_COMPLETIONS_RETENTION_DAYS (30; 0 keeps none):
the chat.completion object as it was returned (a streamed one as the whole
object its chunks add up to), the request's `metadata` and its messages.
- GET /v1/chat/completions lists them in OpenAI's cursor pages (`after`,
  `limit` 1-100, `order` asc by default), filtered by `model` and by
  `metadata[key]=value` pairs (every pair must match);
- GET /v1/chat/completions/{id} is the object, with its metadata;
- POST /v1/chat/completions/{id} {"metadata"} replaces its metadata (the
  only change OpenAI allows);
- DELETE /v1/chat/completions/{id} forgets it;
- GET /v1/chat/completions/{id}/messages lists the request's messages, each
  with an id (`<completion id>-<n>`), its text as `content` and its parts as
  `content_parts` when it was sent as parts.
A completion of another user (an API key bound to users) is unknown to the
caller: not found, not said to exist. The feedback memory's copy of the
answer (PAD_FEEDBACK_RETENTION_DAYS, kept whatever `store` says) is apart:
deleting a stored completion leaves its feedback as it was."""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.auth import Scope, key_scope
from server.auth_scopes import KeyScope
from server.errors import APIError, invalid
from server.messages import content_text
from server.openai_models import ChatCompletion, ChatCompletionRequest, Metadata, StrictRequest
from server.openapi import errors
from server.request_body import JSONRoute
from server.routes.stored_responses import ItemList, cursor_page, item_list, page_limit
from server.store.records import StoredChatCompletion
from server.store.schema import chat_completion_metadata

logger = logging.getLogger(__name__)
router = APIRouter(tags=["chat"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

MAX_METADATA_PAIRS = 16  # as a completion's metadata holds
METADATA_QUERY = re.compile(r"metadata\[(.*)\]")  # the SDK's query form of a filter pair: metadata[key]=value


class UpdateChatCompletion(StrictRequest):
    metadata: Metadata | None = Field(description="the new metadata (replaces it; null: none)")


class ChatCompletionList(BaseModel):
    object: Literal["list"]
    data: list[ChatCompletion]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ChatCompletionDeleted(BaseModel):
    id: str
    object: Literal["chat.completion.deleted"]
    deleted: bool


# ---- keeping one -------------------------------------------------------------
def stored_messages(completion_id: str, body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as OpenAI lists a stored completion's: an id
    each, the text as `content`, the parts as `content_parts` (null when it
    was a string), and the fields the message had (name, tool calls...)."""
    out = []
    for index, message in enumerate(body.messages):
        sent = message.model_dump(exclude_none=True, include={"role", "name", "tool_calls", "tool_call_id",
                                                              "function_call", "refusal"})
        parts = message.content if isinstance(message.content, list) else None
        out.append({"id": f"{completion_id}-{index}", **sent,
                    "content": content_text(message.content, f"messages[{index}].content"),
                    "name": message.name,
                    "content_parts": [part.model_dump() for part in parts] if parts is not None else None})
    return out


async def keep_chat_completion(state, body: ChatCompletionRequest, completion: dict[str, Any],
                               user: str | None) -> None:
    """Keeps an answered chat completion whose request set `store: true`. A
    store that fails is logged, never the answer's failure (as the feedback
    memory's record is not)."""
    store = getattr(state, "store", None)
    if not body.store or store is None or not store.keeps_chat_completions:
        return
    try:
        await store.record_chat_completion(completion, user=user, messages=stored_messages(completion["id"], body),
                                           metadata=dict(body.metadata or {}))
    except Exception:
        logger.exception("could not keep chat completion %s", completion.get("id"))


# ---- reading them --------------------------------------------------------------
def not_kept_reason(store) -> str:
    if store is None or not store.keeps_chat_completions:
        return "this server keeps no chat completions (PAD_CHAT_COMPLETIONS_RETENTION_DAYS is 0)"
    return (f"chat completions are kept for {store.config.chat_completions_retention_days:g} days when their "
            "request's store is true, and only for the API key's own users")


async def kept_or_404(request: Request, scope: KeyScope | None, completion_id: str) -> StoredChatCompletion:
    store = getattr(request.app.state, "store", None)
    kept = None
    if store is not None and store.keeps_chat_completions:
        kept = await store.find_chat_completion(completion_id)
    if kept is None or (scope is not None and not scope.can_access(kept.user_id)):
        raise APIError(404, f"Chat completion with id {completion_id[:80]!r} not found: {not_kept_reason(store)}.",
                       "invalid_request_error", "completion_id", "not_found")
    return kept


def metadata_filter(request: Request) -> dict[str, str]:
    """`metadata[key]=value` query pairs (the SDK's form of `metadata={...}`)."""
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name == "metadata":
            raise invalid("metadata: filter as metadata[key]=value", "metadata", "invalid_value")
        if match := METADATA_QUERY.fullmatch(name):
            key = match[1]
            if key in pairs and pairs[key] != value:  # no completion holds two values under one key
                raise invalid(f"metadata[{key[:64]}] is given two values", "metadata", "invalid_value")
            pairs[key] = value
    if len(pairs) > MAX_METADATA_PAIRS:  # a completion holds at most 16: more can match none
        raise invalid(f"metadata: filter by at most {MAX_METADATA_PAIRS} pairs", "metadata", "invalid_value")
    return pairs


def keyable(text: str) -> bool:
    """A filter's text that a kept completion can hold: no NUL, within its column."""
    return "\x00" not in text and len(text) <= chat_completion_metadata.c.value.type.length


@router.get("/v1/chat/completions", response_model=ChatCompletionList, responses=errors(400, 401))
async def list_chat_completions(request: Request, scope: Scope, after: str | None = None, limit: int = 20,
                                model: str | None = None, order: Literal["asc", "desc"] = "asc"):
    limit, pairs = page_limit(limit), metadata_filter(request)
    store = getattr(request.app.state, "store", None)
    if store is None or not store.keeps_chat_completions:
        if after is not None:
            raise invalid(f"after: no chat completion {after[:80]!r} in this list", "after", "invalid_value")
        return JSONResponse(item_list([]))
    if not all(keyable(text) for text in (model or "", *pairs, *pairs.values())):
        return JSONResponse(item_list([]))  # a value no completion can hold (NUL, too long) matches none
    kept, has_more = await store.list_chat_completions(
        users=None if scope is None else scope.users, model=model, metadata=pairs, after=after, limit=limit,
        descending=order == "desc")
    # as they were returned: not through ChatCompletion, which would reorder their fields
    return JSONResponse(item_list([completion.to_openai() for completion in kept], has_more))


@router.get("/v1/chat/completions/{completion_id}", response_model=ChatCompletion, responses=errors(401, 404))
async def retrieve_chat_completion(completion_id: str, request: Request, scope: Scope):
    return JSONResponse((await kept_or_404(request, scope, completion_id)).to_openai())


@router.post("/v1/chat/completions/{completion_id}", response_model=ChatCompletion,
             responses=errors(400, 401, 404, 413))
async def update_chat_completion(completion_id: str, body: UpdateChatCompletion, request: Request, scope: Scope):
    kept = await kept_or_404(request, scope, completion_id)
    updated = await request.app.state.store.update_chat_completion(kept.completion_id, dict(body.metadata or {}))
    if updated is None:  # deleted meanwhile
        raise APIError(404, f"Chat completion with id {completion_id[:80]!r} not found: it was deleted.",
                       "invalid_request_error", "completion_id", "not_found")
    return JSONResponse(updated.to_openai())


@router.delete("/v1/chat/completions/{completion_id}", response_model=ChatCompletionDeleted,
               responses=errors(401, 404))
async def delete_chat_completion(completion_id: str, request: Request, scope: Scope):
    kept = await kept_or_404(request, scope, completion_id)
    await request.app.state.store.delete_chat_completion(kept.completion_id)
    return {"id": kept.completion_id, "object": "chat.completion.deleted", "deleted": True}


@router.get("/v1/chat/completions/{completion_id}/messages", response_model=ItemList,
            responses=errors(400, 401, 404))
async def list_messages(completion_id: str, request: Request, scope: Scope, after: str | None = None,
                        limit: int = 20, order: Literal["asc", "desc"] = "asc"):
    page_limit(limit)
    messages = (await kept_or_404(request, scope, completion_id)).messages
    return cursor_page(messages, after=after, limit=limit, descending=order == "desc",
                       kind="message", holder="this chat completion")
