"""Feedback: POST /v1/feedback.

{"completion_id": "chatcmpl-...",       required: a completion this server made
 "choice_index": 0,                     which choice (n > 1), default 0
 "rating": "up" | "down" | 1..5,        optional
 "preferred_over": "chatcmpl-...",      optional: this completion is better than
 "preferred_over_choice_index": 0,      that one (same prompt messages)
 "comment": "..."}                      optional
At least one of rating / preferred_over / comment. Answers the stored
feedback object {"id": "fb-...", "object": "feedback", ...}. 404 for a
completion unknown or past the retention, 403 for a completion of a user
the API key is not bound to."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.store.errors import InvalidInput
from server.store.http import get_store, handle, json_object, request_scope

router = APIRouter(tags=["feedback"])
FIELDS = {"completion_id", "choice_index", "rating", "preferred_over", "preferred_over_choice_index", "comment"}


@router.post("/v1/feedback")
async def post_feedback(request: Request):
    async def run():
        scope = request_scope(request)
        store = get_store(request)
        body = await json_object(request, FIELDS)
        if "completion_id" not in body:
            raise InvalidInput("'completion_id' is required", param="completion_id")
        record = await store.record_feedback(
            body["completion_id"],
            choice_index=body.get("choice_index", 0),
            rating=body.get("rating"),
            preferred_over=body.get("preferred_over"),
            preferred_over_choice_index=body.get("preferred_over_choice_index", 0),
            comment=body.get("comment"),
            can_access=None if scope is None else scope.can_access,
        )
        return record.to_openai()

    return await handle(run)
