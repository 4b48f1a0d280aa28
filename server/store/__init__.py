"""Preference memory and feedback storage (SQLite by default, PostgreSQL
with PAD_DB_URL). The gateway opens one Store in its lifespan and keeps it on
`app.state.store`; the routes in server/routes/{users,feedback}.py and the
chat route use it."""

from server.store.config import StoreConfig, StoreSettings
from server.store.errors import Forbidden, InvalidInput, NotFound, StoreError
from server.store.repository import Completion, ExportResult, Feedback, Profile, Store, validate_preferences
from server.store.resolve import UNSET, Resolution, resolve_for_request, resolve_preferences

__all__ = [
    "UNSET",
    "Completion",
    "ExportResult",
    "Feedback",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "Profile",
    "Resolution",
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreSettings",
    "resolve_for_request",
    "resolve_preferences",
    "validate_preferences",
]
