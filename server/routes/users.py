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

from fastapi import APIRouter, Request

from server.auth_scopes import check_user
from server.store.errors import InvalidInput
from server.store.http import get_store, handle, json_object, request_scope

router = APIRouter(tags=["users"])
PATH = "/v1/users/{user_id}/preferences"


@router.get(PATH)
async def get_preferences(user_id: str, request: Request):
    async def run():
        check_user(request_scope(request), user_id)
        return (await get_store(request).get_preferences(user_id)).to_openai()

    return await handle(run)


@router.put(PATH)
async def put_preferences(user_id: str, request: Request):
    async def run():
        check_user(request_scope(request), user_id)
        store = get_store(request)
        body = await json_object(request, {"preferences"})
        if "preferences" not in body:
            raise InvalidInput("'preferences' is required", param="preferences")
        return (await store.put_preferences(user_id, body["preferences"])).to_openai()

    return await handle(run)


@router.patch(PATH)
async def patch_preferences(user_id: str, request: Request):
    async def run():
        check_user(request_scope(request), user_id)
        store = get_store(request)
        body = await json_object(request, {"add", "remove"})
        return (await store.patch_preferences(user_id, add=body.get("add"), remove=body.get("remove"))).to_openai()

    return await handle(run)


@router.delete(PATH)
async def delete_preferences(user_id: str, request: Request):
    async def run():
        check_user(request_scope(request), user_id)
        await get_store(request).delete_preferences(user_id)
        return {"object": "user.preferences.deleted", "user": user_id, "deleted": True}

    return await handle(run)
