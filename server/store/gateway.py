"""What the gateway calls: open/close the store in its lifespan, and the
two chat-route hooks (resolve preferences before generation, remember the
completion after it). Keeps the gateway's own code to a few lines:

    # lifespan (server/app.py)
    await open_store(app, settings)      # app.state.store (+ key_table if unset)
    ...
    await close_store(app)

    # chat route (server/routes/chat.py), before building the engine request
    user, resolution = await resolve_chat(request, body.user,
        body.preference if "preference" in body.model_fields_set else UNSET)
    preferences = resolution.preferences          # list[pad_core.types.Preference]
    # ... after the last token (streaming: before `data: [DONE]`)
    await remember_completion(request, completion_id, user=user, messages=messages,
        preferences=preferences, answers=[choice texts by index], model=model_name, created=created)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pad_core.types import Preference
from server.auth_scopes import KeyTable, chat_user
from server.store.repository import Store
from server.store.resolve import UNSET, Resolution, resolve_for_request

logger = logging.getLogger(__name__)


async def open_store(app: Any, settings: object | None = None) -> Store:
    """Opens the store from the settings (PAD_DB_URL / PAD_DATA_DIR ...) onto
    app.state.store; also puts a KeyTable on app.state.key_table unless the
    gateway set one."""
    store = await Store.open(settings=settings)
    app.state.store = store
    if getattr(app.state, "key_table", None) is None:
        app.state.key_table = KeyTable.from_settings(settings) if settings is not None else KeyTable()
    return store


async def close_store(app: Any) -> None:
    store = getattr(app.state, "store", None)
    if store is not None:
        app.state.store = None
        await store.close()


def _scope(request: Any):
    from server.store.http import request_scope

    return request_scope(request)


async def resolve_chat(request: Any, user: str | None, request_preference: Any = UNSET) -> tuple[str | None, Resolution]:
    """(effective user, preferences) of a chat request. Raises StoreError
    (Forbidden 403 for a user outside the key's binding, 401 for a bad key
    when the gateway left auth to us); the route maps it with `.status` and
    `.to_openai()`."""
    effective = chat_user(_scope(request), user)
    store = getattr(request.app.state, "store", None)
    return effective, await resolve_for_request(store, effective, request_preference)


async def remember_completion(
    request: Any,
    completion_id: str,
    *,
    messages: Sequence[Any],
    answers: Sequence[str] | str,
    preferences: Sequence[Preference] | None = None,
    user: str | None = None,
    model: str = "",
    created: int | None = None,
) -> bool:
    """Keeps the completion for feedback. Never raises: a storage failure is
    logged and the answer still goes out (feedback on it will then 404)."""
    store = getattr(request.app.state, "store", None)
    if store is None:
        return False
    try:
        return await store.record_completion(
            completion_id, messages=messages, answers=answers, preferences=preferences, user=user, model=model,
            created=created,
        )
    except Exception:
        logger.exception("could not keep completion %s for feedback", completion_id)
        return False
