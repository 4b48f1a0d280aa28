"""The gateway's storage (SQLite by default, PostgreSQL with PAD_DB_URL):
preference memory, feedback, and what the stored APIs keep (responses, chat
completions, files, batches, conversations). The gateway opens one Store in
its lifespan and keeps it on `app.state.store`; server/store/repository.py
says which module holds which records."""

from server.store.config import StoreConfig, StoreSettings
from server.store.errors import Forbidden, InvalidInput, NotFound, StoreError
from server.store.preferences import validate_preferences
from server.store.records import Completion, ExportResult, Feedback, Profile
from server.store.repository import Store
from server.store.resolve import (
    UNSET,
    Resolution,
    resolve_for_request,
    resolve_preferences,
)

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
