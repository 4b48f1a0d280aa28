"""OpenAI's Conversations API: a conversation kept on the server, its items
in order, and `conversation` on POST /v1/responses, which reads the
conversation's items before the request's input and adds the input and the
answer's items after the answer.

- POST   /v1/conversations                      {items?, metadata?} -> conversation
- GET    /v1/conversations/{id}                 -> conversation
- POST   /v1/conversations/{id}                 {metadata} -> conversation (metadata replaced)
- DELETE /v1/conversations/{id}                 -> conversation.deleted (its items too)
- POST   /v1/conversations/{id}/items           {items} -> the list of the items added
- GET    /v1/conversations/{id}/items           cursor pages (after, limit 1-100, order: desc default)
- GET    /v1/conversations/{id}/items/{item_id} -> the item
- DELETE /v1/conversations/{id}/items/{item_id} -> the conversation

Items are message, function_call and function_call_output items (and
another model's reasoning items, kept but not read), or item_references to
a kept response's output items; each gets an id (the client's unless the
conversation holds that id already). Conversations are kept until deleted,
as OpenAI keeps them (PAD_RESPONSES_RETENTION_DAYS is for responses).

A conversation belongs to the API key's user, as a kept response does: a
key bound to one user owns its conversations, a key bound to several names
the owner with `user` (a PAD extension on create), an unbound key's belong
to no user (only unbound keys reach them). Another user's conversation is
unknown to the caller: not found, not said to exist."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from server.auth import Scope, key_scope
from server.auth_scopes import KeyScope, chat_user
from server.errors import APIError, invalid
from server.messages import response_input_messages
from server.openai_models import Metadata, StrictRequest
from server.openapi import errors
from server.request_body import JSONRoute
from server.routes.stored_responses import (
    ItemList,
    item_list,
    page_limit,
    resolve_item_references,
    stored_input_items,
)
from server.store import schema
from server.store.http import StoreDep
from server.store.base import keyable
from server.store.records import StoredConversation

logger = logging.getLogger(__name__)
router = APIRouter(tags=["conversations"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

MAX_ITEMS_ADDED = 1000  # a call (OpenAI takes 20; agents add a whole turn's items at once)
ITEM_ID = schema.conversation_items.c.item_id


# ---- the bodies and objects ---------------------------------------------------
class CreateConversation(StrictRequest):
    items: list[dict[str, Any]] | None = Field(None, max_length=MAX_ITEMS_ADDED)
    metadata: Metadata | None = None
    user: str | None = Field(None, description="PAD: the owner, for an API key bound to several users")


class UpdateConversation(StrictRequest):
    metadata: Metadata | None = Field(description="the new metadata (replaces it; null: none)")


class AddItems(StrictRequest):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ITEMS_ADDED)


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]


class DeletedConversation(BaseModel):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


# ---- what the routes and /v1/responses share ----------------------------------
async def find_conversation(store, scope: KeyScope | None, conversation_id: str) -> StoredConversation | None:
    """The conversation of that id that this key may read, else None."""
    if store is None:
        return None
    found = await store.find_conversation(conversation_id)
    if found is None or (scope is not None and not scope.can_access(found.user_id)):
        return None
    return found


class ConversationTurns:
    """The turns of the conversations a response is being answered in: a
    second response in one of them is OpenAI's 400 conversation_locked (it
    would answer on a history about to change). A turn is a lease in the
    store, so every gateway over one store sees it; its holder renews it
    every third of `lease_s` while the answer is written, and a gateway that
    died holds the conversation only until its lease runs out. (Gateways'
    clocks are assumed within a fraction of the lease of each other.)"""

    def __init__(self, store, lease_s: float) -> None:
        self._store = store
        self._lease_s = lease_s
        self._renewals: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()  # turns being taken or given back, and the renewals

    async def begin(self, conversation_id: str) -> Turn:
        """Takes the conversation's turn (a 404 when it is gone, a 400
        conversation_locked while another holds it)."""
        token = uuid.uuid4().hex
        taking = self._spawn(self._store.take_turn(conversation_id, token, self._lease_s))
        try:
            taken = await asyncio.shield(taking)
        except asyncio.CancelledError:
            # Its caller went away while the turn was being taken: give it back
            # once taken, or the conversation stays locked for a whole lease.
            taking.add_done_callback(lambda done: self._given_back_if_taken(done, conversation_id, token))
            raise
        if taken is None:
            raise conversation_not_found(conversation_id, "conversation")
        if not taken:
            raise APIError(400, "Another process is currently operating on this conversation. Please retry in a "
                           "few seconds.", "invalid_request_error", "conversation", "conversation_locked")
        renewal = self._spawn(self._renew(conversation_id, token))
        self._renewals.add(renewal)
        renewal.add_done_callback(self._renewals.discard)
        return Turn(self, conversation_id, token, renewal)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _given_back_if_taken(self, taking: asyncio.Task, conversation_id: str, token: str) -> None:
        if not taking.cancelled() and taking.exception() is None and taking.result():
            self._spawn(self._end(conversation_id, token))

    async def _renew(self, conversation_id: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                held = await self._store.renew_turn(conversation_id, token, self._lease_s)
            except Exception:  # the store unreachable: try again; the lease may run out meanwhile
                logger.warning("could not renew the turn of conversation %s", conversation_id, exc_info=True)
                continue
            if not held:
                logger.warning("conversation %s: the turn being answered ran out (or the conversation was "
                               "deleted) before its answer was done", conversation_id)
                return

    async def _end(self, conversation_id: str, token: str) -> None:
        try:
            await self._store.end_turn(conversation_id, token)
        except Exception:  # its lease runs out instead
            logger.warning("could not give back the turn of conversation %s", conversation_id, exc_info=True)

    async def close(self) -> None:
        """Stops renewing; waits for the turns being taken or given back (before the store closes)."""
        for renewal in list(self._renewals):
            renewal.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Turn:
    """A conversation's turn, held: `await end()` gives it back (or
    `end_after(joining)`, once the answer is in the conversation), before
    the client is told the answer is done (so its next turn finds the
    conversation free); `release()` is the same for the paths that cannot
    wait (an error, a stream cut short, a finalizer in any thread): the turn
    is given back soon after. All are safe to call more than once."""

    def __init__(self, turns: ConversationTurns, conversation_id: str, token: str, renewal: asyncio.Task) -> None:
        self._turns = turns
        self._conversation_id = conversation_id
        self._token = token
        self._renewal = renewal
        self._loop = asyncio.get_running_loop()
        self._ended = False
        self._finishing: asyncio.Task | None = None  # the answer joining the conversation, then `end`

    async def end(self) -> None:
        if self._stop():
            await self._turns._end(self._conversation_id, self._token)

    async def end_after(self, joining: Awaitable[None]) -> None:
        """Runs `joining` (the answer's items joining the conversation),
        then gives the turn back: both to their end, even when the caller is
        cancelled (its client hung up) meanwhile, so the next turn never
        finds the conversation free before the answer is in it."""
        async def join_then_end() -> None:
            try:
                await joining
            finally:
                await self.end()

        self._finishing = self._turns._spawn(join_then_end())
        await asyncio.shield(self._finishing)

    def release(self) -> None:
        try:
            on_the_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_the_loop = False
        if on_the_loop:
            self._release()
            return
        try:  # a finalizer run by the garbage collector in another thread
            self._loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop is closed (at exit): the lease runs out
            pass

    def _release(self) -> None:
        if self._finishing is not None:  # the turn is given back once the answer is in
            return
        if self._stop():
            self._turns._spawn(self._turns._end(self._conversation_id, self._token))

    def _stop(self) -> bool:
        """Stops renewing; whether the turn was still to be given back."""
        if self._ended:
            return False
        self._ended = True
        self._renewal.cancel()
        return True


def conversation_not_found(conversation_id: str, param: str) -> APIError:
    return APIError(404, f"Conversation with id {conversation_id[:80]!r} not found.", "invalid_request_error",
                    param, "conversation_not_found")


def check_item_ids(items: str | list[dict[str, Any]], param: str) -> None:
    """The items' own ids are ones a conversation can key: at most
    the store's item id length, no NUL (PostgreSQL text cannot hold one).
    Other responses keep their input as JSON and take any string."""
    for index, item in enumerate(items if isinstance(items, list) else ()):
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, str) and item_id and not keyable(item_id, ITEM_ID):  # "": one is given
            raise invalid(f"{param}[{index}].id must be at most {ITEM_ID.type.length} characters, without NUL",
                          f"{param}[{index}].id", "invalid_value")


async def checked_items(store, scope: KeyScope | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items to keep: item_references resolved, each item one the Responses
    API reads (a 400 naming items[i] otherwise), each with an id."""
    items = await resolve_item_references(store, scope, items, param="items")
    response_input_messages(items, None, param="items", require_messages=False)
    check_item_ids(items, "items")
    return stored_input_items(items)


# ---- the routes ------------------------------------------------------------------
async def conversation_or_404(store, scope: KeyScope | None, conversation_id: str) -> StoredConversation:
    found = await find_conversation(store, scope, conversation_id)
    if found is None:
        raise conversation_not_found(conversation_id, "conversation_id")
    return found


@router.post("/v1/conversations", response_model=ConversationObject, responses=errors(400, 401, 403, 413, 503))
async def create_conversation(store: StoreDep, scope: Scope, body: CreateConversation | None = None):
    body = body or CreateConversation()  # every field is optional: no body at all is an empty conversation
    user = chat_user(scope, body.user)
    items = await checked_items(store, scope, body.items) if body.items else []
    conversation, _ = await store.create_conversation(user=user, metadata=body.metadata or {}, items=items)
    return conversation.to_openai()


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationObject,
            responses=errors(401, 404, 503))
async def retrieve_conversation(conversation_id: str, store: StoreDep, scope: Scope):
    return (await conversation_or_404(store, scope, conversation_id)).to_openai()


@router.post("/v1/conversations/{conversation_id}", response_model=ConversationObject,
             responses=errors(400, 401, 404, 413, 503))
async def update_conversation(conversation_id: str, body: UpdateConversation, store: StoreDep, scope: Scope):
    found = await conversation_or_404(store, scope, conversation_id)
    updated = await store.update_conversation(found.conversation_id, body.metadata or {})
    if updated is None:  # deleted meanwhile
        raise conversation_not_found(conversation_id, "conversation_id")
    return updated.to_openai()


@router.delete("/v1/conversations/{conversation_id}", response_model=DeletedConversation,
               responses=errors(401, 404, 503))
async def delete_conversation(conversation_id: str, store: StoreDep, scope: Scope):
    found = await conversation_or_404(store, scope, conversation_id)
    await store.delete_conversation(found.conversation_id)
    return {"id": found.conversation_id, "object": "conversation.deleted", "deleted": True}


@router.post("/v1/conversations/{conversation_id}/items", response_model=ItemList,
             responses=errors(400, 401, 404, 413, 503))
async def add_items(conversation_id: str, body: AddItems, store: StoreDep, scope: Scope,
                    include: Annotated[list[str] | None, Query()] = None):
    found = await conversation_or_404(store, scope, conversation_id)
    added = await store.add_conversation_items(found.conversation_id, await checked_items(store, scope, body.items))
    if added is None:  # deleted meanwhile
        raise conversation_not_found(conversation_id, "conversation_id")
    return item_list(added)


@router.get("/v1/conversations/{conversation_id}/items", response_model=ItemList,
            responses=errors(400, 401, 404, 503))
async def list_items(conversation_id: str, store: StoreDep, scope: Scope, after: str | None = None,
                     limit: int = 20, order: Literal["asc", "desc"] = "desc",
                     include: Annotated[list[str] | None, Query()] = None):
    page_limit(limit)
    found = await conversation_or_404(store, scope, conversation_id)
    items, has_more = await store.conversation_items(found.conversation_id, after=after, limit=limit,
                                                     descending=order == "desc")
    return item_list(items, has_more)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}", responses=errors(401, 404, 503))
async def retrieve_item(conversation_id: str, item_id: str, store: StoreDep, scope: Scope,
                        include: Annotated[list[str] | None, Query()] = None) -> dict[str, Any]:
    found = await conversation_or_404(store, scope, conversation_id)
    item = await store.find_conversation_item(found.conversation_id, item_id)
    if item is None:
        raise item_not_in(conversation_id, item_id)
    return item


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}", response_model=ConversationObject,
               responses=errors(401, 404, 503))
async def delete_item(conversation_id: str, item_id: str, store: StoreDep, scope: Scope):
    found = await conversation_or_404(store, scope, conversation_id)
    if not await store.delete_conversation_item(found.conversation_id, item_id):
        raise item_not_in(conversation_id, item_id)
    return found.to_openai()


def item_not_in(conversation_id: str, item_id: str) -> APIError:
    return APIError(404, f"Item with id {item_id[:80]!r} not found in conversation {conversation_id[:80]!r}.",
                    "invalid_request_error", "item_id", "item_not_found")
