"""OpenAI's Batch API (`client.batches`): POST /v1/batches runs the requests
of an uploaded file (server/routes/files.py) in the gateway
(server/batches.py), GET /v1/batches/{id} reads its state, POST
/v1/batches/{id}/cancel cancels it, GET /v1/batches lists them (newest
first; `limit`, `after`). A batch belongs to its key's user as its input
file does; another user's batch is a 404, as an unknown one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from server import batches
from server.auth import Scope, key_scope
from server.auth_scopes import KeyScope, chat_user
from server.errors import APIError, invalid
from server.openai_models import Metadata, StrictRequest
from server.openapi import errors
from server.request_body import JSONRoute
from server.routes.files import ExpiresAfter, find_file
from server.routes.stored_responses import item_list, page_limit
from server.store.records import StoredBatch

router = APIRouter(tags=["batches"], route_class=JSONRoute, dependencies=[Depends(key_scope)])


class BatchRequest(StrictRequest):
    input_file_id: str = Field(description="an uploaded file (purpose batch) of requests, one JSON object a line")
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"]
    completion_window: Literal["24h"]
    metadata: Metadata | None = None
    output_expires_after: ExpiresAfter | None = Field(None, description="when the output and error files "
                                                      "expire; without it they are kept until deleted")
    user: str | None = Field(None, description="PAD: the batch's user, for a key bound to several")


def batch_not_found(batch_id: str) -> APIError:
    return APIError(404, f"No batch found with id {batch_id[:80]!r}", "invalid_request_error", "batch_id",
                    "batch_not_found")


async def find_batch(request: Request, scope: KeyScope | None, batch_id: str) -> StoredBatch:
    """The batch as it is now, if the caller's key may read it; else a 404
    (a Message Batch too: it is Anthropic's API's)."""
    state = request.app.state
    found = await state.store.find_batch(batch_id) if batch_id.startswith(batches.BATCH_ID_PREFIX) else None
    if found is None or (scope is not None and not scope.can_access(found.user_id)):
        raise batch_not_found(batch_id)
    look_if_orphaned(state, found)
    return found


def look_if_orphaned(state, kept: StoredBatch) -> None:
    """A batch running that no gateway holds (its own stopped or died)
    makes this gateway look for batches to resume at once."""
    if not kept.running and kept.batch["status"] in batches.RUNNING and not state.batches.runs_here(kept.batch_id):
        state.batches.look_now()


@router.post("/v1/batches", responses=errors(400, 401, 403, 404, 413, 503))
async def create_batch(body: BatchRequest, request: Request, scope: Scope) -> dict[str, Any]:
    user = chat_user(scope, body.user)
    input_file = await find_file(request, scope, body.input_file_id, "input_file_id")
    if input_file.purpose != "batch":
        raise invalid(f"input_file_id: the file's purpose is {input_file.purpose!r}, not 'batch'", "input_file_id")
    batch = batches.new_batch(input_file.file_id, body.endpoint, body.metadata)
    expires = body.output_expires_after
    await request.app.state.batches.start(batch, user, scope, None if expires is None else expires.seconds)
    return batch


@router.get("/v1/batches/{batch_id}", responses=errors(401, 404))
async def retrieve_batch(batch_id: str, request: Request, scope: Scope) -> dict[str, Any]:
    return (await find_batch(request, scope, batch_id)).batch


@router.post("/v1/batches/{batch_id}/cancel", responses=errors(400, 401, 404))
async def cancel_batch(batch_id: str, request: Request, scope: Scope) -> dict[str, Any]:
    """Cancels a running batch (`cancel_running`). A finished one is a 400;
    a cancelled one is returned as it is."""
    found = await find_batch(request, scope, batch_id)
    status = found.batch["status"]
    if status in ("cancelled", "cancelling"):
        return found.batch
    if status not in batches.RUNNING:
        raise invalid(f"Cannot cancel a batch that is already {status}", "batch_id")
    return (await cancel_running(request, found, lambda: find_batch(request, scope, batch_id))).batch


async def cancel_running(request: Request, found: StoredBatch,
                         read_again: Callable[[], Awaitable[StoredBatch]]) -> StoredBatch:
    """Cancels a batch found running: on this gateway at once (its results
    so far written); on another, asked through the store and waited for a
    while (`cancelling` until its run has read the ask); one that no gateway
    runs now, by the gateway that resumes it (this one looks at once).
    Returns the batch as it is then (`read_again` reads it)."""
    state = request.app.state
    batch_id = found.batch_id
    if await state.batches.cancel(batch_id):
        found = await read_again()
        if found.batch["status"] not in batches.RUNNING:
            return found
        # still running: this gateway's run had lost its lease to another, which the ask reaches
    if await state.store.request_batch_cancel(batch_id):
        if not found.running:
            state.batches.look_now()
        deadline = time.monotonic() + state.settings.background_lease_s / 3 + 2.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            found = await read_again()
            if found.batch["status"] not in batches.RUNNING:
                return found
        return found  # `cancelling` until its runner reads the ask
    return await read_again()


@router.get("/v1/batches", responses=errors(400, 401))
async def list_batches(request: Request, scope: Scope, after: str | None = None, limit: int = 20
                       ) -> dict[str, Any]:
    page_limit(limit)
    state = request.app.state
    found, more = await state.store.list_batches(users=None if scope is None else scope.users, after=after,
                                                 limit=limit, id_prefix=batches.BATCH_ID_PREFIX)
    for kept in found:
        look_if_orphaned(state, kept)
    return item_list([kept.batch for kept in found], more)
