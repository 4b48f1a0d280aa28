"""The store as a FastAPI dependency, for the users and feedback routers.
Store errors are answered by the gateway's one set of error handlers
(server/errors.py); authentication is server/auth.py's dependency."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from server.store.errors import StoreError


class StoreUnavailable(StoreError):
    status = 503
    type = "server_error"
    default_code = "store_unavailable"


def get_store(request: Request) -> Any:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise StoreUnavailable("preference storage is not available")
    return store


StoreDep = Annotated[Any, Depends(get_store)]
