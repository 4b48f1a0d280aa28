"""Anthropic's Message Batches API (`client.messages.batches`): many
/v1/messages requests at once, answered in the background.

POST /v1/messages/batches takes `requests` ({custom_id, params} each, params
a /v1/messages body) and runs them as a batch of the Batch API does
(server/batches.py: leased, resumed by another gateway if this one stops,
`PAD_BATCH_CONCURRENCY` at a time, each request checked and answered as if
its client had sent it): its input is stored as a file (`{id}_requests.jsonl`),
its results as its output and error files, all three the batch's own (not
in /v1/files, where deleting one would lose its results). GET /v1/messages/batches/{id} shows it as
Anthropic's `message_batch`; GET .../results streams its results as JSONL
once it has ended (succeeded, errored, canceled or expired, one line per
request, in input order); POST .../cancel cancels it; DELETE deletes an
ended one with its files; GET /v1/messages/batches lists them (newest
first; `limit`, `after_id`, `before_id`). Errors have Anthropic's shape
(server/anthropic_errors.py). As Anthropic, a request's `params` are checked
when it runs (a bad one is an `errored` result), the envelope at once.
The results, like Anthropic's, are kept 29 days after the batch's creation;
then the batch reads `archived_at` and its `results_url` is null."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from server import batches
from server.anthropic_errors import AnthropicErrorResponse
from server.auth import Scope, key_scope
from server.auth_scopes import KeyScope, chat_user
from server.errors import APIError, invalid
from server.openapi import errors
from server.request_body import JSONRoute
from server.routes.batches import cancel_running, look_if_orphaned
from server.store.records import StoredBatch, StoredFile

router = APIRouter(tags=["anthropic"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

ID_PREFIX = batches.MESSAGE_BATCH_ID_PREFIX


def failures(*statuses: int) -> dict:
    """`responses=` of a route: these statuses, with Anthropic's error body."""
    return errors(*statuses, body=AnthropicErrorResponse)


ENDPOINT = "/v1/messages"
RESULTS_KEPT_S = 29 * 86400  # Anthropic keeps a batch's results 29 days after its creation
# Anthropic's result type of a request the batch ended without answering, by the batch's end.
UNANSWERED = {"cancelled": "canceled", "expired": "expired"}


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    custom_id: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]{1,64}$",
                           description="yours, unique in the batch: matches a result to its request")
    params: dict[str, Any] = Field(description="a /v1/messages body (not streamed), checked when it runs")


class CreateMessageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[BatchItem] = Field(min_length=1, max_length=batches.MAX_REQUESTS)
    user: str | None = Field(None, description="PAD: the batch's user, for a key bound to several")


def rfc3339(unix: int | None) -> str | None:
    return None if unix is None else datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


def has_ended(batch: dict[str, Any]) -> bool:
    return batch["status"] not in batches.RUNNING


def request_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Anthropic's tallies: every request `processing` until the batch ends,
    then each where its result put it."""
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    done = batch["request_counts"]
    total = done["total"]
    if not has_ended(batch):
        counts["processing"] = total
        return counts
    counts["succeeded"], counts["errored"] = done["completed"], done["failed"]
    left = max(total - done["completed"] - done["failed"], 0)
    counts[UNANSWERED.get(batch["status"], "errored")] += left  # a failed batch's unanswered requests errored
    return counts


def message_batch(kept: StoredBatch, request: Request) -> dict[str, Any]:
    """The batch as Anthropic's `message_batch` object."""
    batch = kept.batch
    status = batch["status"]
    ended_at = next((batch[key] for key in ("completed_at", "failed_at", "expired_at", "cancelled_at")
                     if batch.get(key)), None)
    ended = has_ended(batch)
    archived_at = batch["created_at"] + RESULTS_KEPT_S  # its input (so its results) is gone from then on
    archived = ended and time.time() >= archived_at
    return {
        "id": batch["id"],
        "type": "message_batch",
        "processing_status": "ended" if ended else "canceling" if status == "cancelling" else "in_progress",
        "request_counts": request_counts(batch),
        "created_at": rfc3339(batch["created_at"]),
        "expires_at": rfc3339(batch["expires_at"]),
        "ended_at": rfc3339(ended_at) if ended else None,
        "cancel_initiated_at": rfc3339(batch.get("cancelling_at")),
        "archived_at": rfc3339(archived_at) if archived else None,
        "results_url": f"{str(request.base_url).rstrip('/')}/v1/messages/batches/{batch['id']}/results"
        if ended and not archived else None,
    }


def batch_not_found(batch_id: str) -> APIError:
    return APIError(404, f"No message batch found with id {batch_id[:80]!r}", param="message_batch_id",
                    code="not_found")


async def find_message_batch(request: Request, scope: KeyScope | None, batch_id: str) -> StoredBatch:
    """The Message Batch, if the caller's key may read it; else a 404 (the
    Batch API's own batches are not Anthropic's)."""
    state = request.app.state
    found = await state.store.find_batch(batch_id) if batch_id.startswith(ID_PREFIX) else None
    if found is None or (scope is not None and not scope.can_access(found.user_id)):
        raise batch_not_found(batch_id)
    look_if_orphaned(state, found)
    return found


def check_items(items: list[BatchItem]) -> None:
    """What the envelope must hold beyond its types: unique custom_ids, and
    no request that streams (the others' params are checked as they run)."""
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.custom_id in seen:
            raise invalid(f"requests.{index}.custom_id: {item.custom_id!r} is used by an earlier request; "
                          "each request's must be unique", f"requests.{index}.custom_id")
        seen.add(item.custom_id)
        if item.params.get("stream"):
            raise invalid(f"requests.{index}.params.stream: a batch request cannot stream",
                          f"requests.{index}.params.stream")


def input_lines(items: list[BatchItem]) -> bytes:
    """The requests as an input file of the Batch API (one JSON line each)."""
    return "".join(json.dumps({"custom_id": item.custom_id, "method": "POST", "url": ENDPOINT, "body": item.params},
                              ensure_ascii=False) + "\n" for item in items).encode("utf-8")


@router.post("/v1/messages/batches", responses=failures(400, 401, 403, 413, 503))
async def create_message_batch(body: CreateMessageBatch, request: Request, scope: Scope) -> dict[str, Any]:
    state = request.app.state
    user = chat_user(scope, body.user)
    check_items(body.requests)
    content = input_lines(body.requests)
    batch = batches.new_batch(f"file-{uuid.uuid4().hex}", ENDPOINT, None, id_prefix=ID_PREFIX)
    batch["request_counts"]["total"] = len(body.requests)  # known now (the Batch API's once its file is read)
    created = batch["created_at"]
    await state.store.record_file(StoredFile(batch["input_file_id"], user, batches.MESSAGE_BATCH_INPUT,
                                             f"{batch['id']}_requests.jsonl", len(content), created,
                                             created + RESULTS_KEPT_S), content)
    await state.batches.start(batch, user, scope, RESULTS_KEPT_S)
    return message_batch(StoredBatch(batch["id"], user, batch, True), request)


@router.get("/v1/messages/batches/{message_batch_id}", responses=failures(401, 404))
async def retrieve_message_batch(message_batch_id: str, request: Request, scope: Scope) -> dict[str, Any]:
    return message_batch(await find_message_batch(request, scope, message_batch_id), request)


@router.post("/v1/messages/batches/{message_batch_id}/cancel", responses=failures(400, 401, 404))
async def cancel_message_batch(message_batch_id: str, request: Request, scope: Scope) -> dict[str, Any]:
    """Cancels a batch still running (its answers so far stay its results);
    an ended one is returned as it is, as Anthropic does."""
    found = await find_message_batch(request, scope, message_batch_id)
    if found.batch["status"] != "cancelling" and not has_ended(found.batch):
        found = await cancel_running(request, found, lambda: find_message_batch(request, scope, message_batch_id))
    return message_batch(found, request)


@router.delete("/v1/messages/batches/{message_batch_id}", responses=failures(400, 401, 404))
async def delete_message_batch(message_batch_id: str, request: Request, scope: Scope) -> dict[str, Any]:
    """Deletes an ended batch, its results and its input; a running one must
    be cancelled first (Anthropic's rule)."""
    store = request.app.state.store
    found = await find_message_batch(request, scope, message_batch_id)
    if not has_ended(found.batch):
        raise invalid(f"message batch {message_batch_id!r} is still processing: cancel it first, then delete it "
                      "once it has ended", "message_batch_id")
    await store.delete_batch(message_batch_id)
    for key in ("input_file_id", "output_file_id", "error_file_id"):
        if found.batch.get(key):
            await store.delete_file(found.batch[key])
    return {"id": message_batch_id, "type": "message_batch_deleted"}


@router.get("/v1/messages/batches", responses=failures(400, 401))
async def list_message_batches(request: Request, scope: Scope, limit: int = Query(20, ge=1, le=1000),
                               after_id: str | None = None, before_id: str | None = None) -> dict[str, Any]:
    """A page of the caller's Message Batches, newest first: those after
    `after_id`, or those just before `before_id`."""
    if after_id is not None and before_id is not None:
        raise invalid("give after_id or before_id, not both", "before_id")
    state = request.app.state
    found, more = await state.store.list_batches(users=None if scope is None else scope.users, after=after_id,
                                                 before=before_id, limit=limit, id_prefix=ID_PREFIX)
    for kept in found:
        look_if_orphaned(state, kept)
    data = [message_batch(kept, request) for kept in found]
    return {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/v1/messages/batches/{message_batch_id}/results", response_class=Response,
            responses={**failures(400, 401, 404), 200: {
                "description": "one result a line: {custom_id, result: {type: succeeded | errored | canceled | "
                               "expired, ...}}", "content": {"application/x-jsonl": {"schema": {"type": "string"}}}}})
async def message_batch_results(message_batch_id: str, request: Request, scope: Scope) -> Response:
    store = request.app.state.store
    found = await find_message_batch(request, scope, message_batch_id)
    batch = found.batch
    if not has_ended(batch):
        raise invalid(f"message batch {message_batch_id!r} is still processing: its results are ready once its "
                      "processing_status is ended", "message_batch_id")
    results: dict[str, dict[str, Any]] = {}
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            content = await store.file_content(batch[key])
            if content is None:
                raise APIError(404, f"the results of message batch {message_batch_id!r} are no longer kept",
                               param="message_batch_id", code="not_found")
            for raw in content.splitlines():
                line = json.loads(raw)
                results[line["custom_id"]] = line
    requests = await store.file_content(batch["input_file_id"])
    if requests is None:
        raise APIError(404, f"the requests of message batch {message_batch_id!r} are no longer kept",
                       param="message_batch_id", code="not_found")
    lines = (anthropic_result(json.loads(raw)["custom_id"], results, batch) for raw in requests.splitlines()
             if raw.strip())
    body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    return Response(body, media_type="application/x-jsonl")


def anthropic_result(custom_id: str, results: dict[str, dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    """One request's result line, from the Batch API's result of it (or its
    absence: the batch ended first)."""
    found = results.get(custom_id)
    if found is None:
        kind = UNANSWERED.get(batch["status"])
        if kind is not None:
            return {"custom_id": custom_id, "result": {"type": kind}}
        reason = ((batch.get("errors") or {}).get("data") or [{}])[0].get("message") or "the batch failed"
        return errored(custom_id, "api_error", reason)
    response = found.get("response")
    if response is not None and 200 <= response["status_code"] < 300:
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": response["body"]}}
    body = response["body"] if response is not None else None
    if isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict):
        return {"custom_id": custom_id, "result": {"type": "errored", "error": body}}
    error = found.get("error") or {}
    return errored(custom_id, "invalid_request_error" if response is None else "api_error",
                   error.get("message") or "the request failed")


def errored(custom_id: str, kind: str, message: str) -> dict[str, Any]:
    return {"custom_id": custom_id,
            "result": {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}}
