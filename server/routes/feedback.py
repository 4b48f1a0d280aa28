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

from fastapi import APIRouter, Depends

from server.auth import Scope, key_scope
from server.openai_models import FeedbackRecord, FeedbackRequest
from server.openapi import errors
from server.request_body import JSONRoute
from server.store.http import StoreDep

router = APIRouter(tags=["feedback"], route_class=JSONRoute, dependencies=[Depends(key_scope)])


@router.post("/v1/feedback", response_model=FeedbackRecord, responses=errors(400, 401, 403, 404, 413, 503))
async def post_feedback(body: FeedbackRequest, scope: Scope, store: StoreDep):
    record = await store.record_feedback(
        body.completion_id,
        choice_index=body.choice_index,
        rating=body.rating,
        preferred_over=body.preferred_over,
        preferred_over_choice_index=body.preferred_over_choice_index,
        comment=body.comment,
        can_access=None if scope is None else scope.can_access,
    )
    return record.to_openai()
