"""Preference memory: GET/PUT/PATCH/DELETE /v1/users/{user_id}/preferences.

PUT   {"preferences": ["short answers", {"text": "humour", "weight": 0.5}]}
      replaces the list (creates the profile); [] keeps an empty profile.
PATCH {"add": [...], "remove": ["text", ...]} edits the list in place: an
      added text already stored gets the new weight; removing an absent text
      is a no-op. 404 when the user has no profile.
GET   the profile; DELETE removes it (404 when there is none).
Profile object: {"object": "user.preferences", "user", "preferences":
[{"text", "weight"}], "created_at", "updated_at"}. Texts are returned
exactly as stored. A key bound to other users gets 403."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.auth import UserId, key_scope
from server.openai_models import DeletedProfile, PatchPreferences, PreferenceProfile, PutPreferences
from server.openapi import errors
from server.request_body import JSONRoute
from server.store.http import StoreDep

router = APIRouter(tags=["users"], route_class=JSONRoute, dependencies=[Depends(key_scope)])
PATH = "/v1/users/{user_id:path}/preferences"  # :path: a user id may hold "/" (chat's `user` does)


@router.get(PATH, response_model=PreferenceProfile, responses=errors(400, 401, 403, 404, 413, 503))
async def get_preferences(user_id: UserId, store: StoreDep):
    return (await store.get_preferences(user_id)).to_openai()


@router.put(PATH, response_model=PreferenceProfile, responses=errors(400, 401, 403, 413, 503))
async def put_preferences(body: PutPreferences, user_id: UserId, store: StoreDep):
    return (await store.put_preferences(user_id, body.preferences)).to_openai()


@router.patch(PATH, response_model=PreferenceProfile, responses=errors(400, 401, 403, 404, 413, 503))
async def patch_preferences(body: PatchPreferences, user_id: UserId, store: StoreDep):
    return (await store.patch_preferences(user_id, add=body.add, remove=body.remove)).to_openai()


@router.delete(PATH, response_model=DeletedProfile, responses=errors(400, 401, 403, 404, 413, 503))
async def delete_preferences(user_id: UserId, store: StoreDep):
    await store.delete_preferences(user_id)
    return {"object": "user.preferences.deleted", "user": user_id, "deleted": True}
