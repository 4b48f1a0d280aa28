"""The store: user preference profiles, completions kept for feedback,
feedback, stored chat completions, stored Responses API responses and their
background runs, Files API files, Batch API batches and Conversations API
conversations, on SQLite (default) or PostgreSQL, through SQLAlchemy's
asyncio API.

One module per kind of record (server/store/preferences.py, feedback.py,
responses.py, chat_completions.py, files.py, batches.py, conversations.py),
each a mixin over server/store/base.py's connection and transactions (its
docstring says how writes are made durable); retention.py prunes what has
expired. `Store` puts them together: open one with `await Store.open(config)`
and close it with `await store.close()`.
"""

from __future__ import annotations

from server.store.batches import BatchStore
from server.store.chat_completions import ChatCompletionStore
from server.store.conversations import ConversationStore
from server.store.feedback import FeedbackStore
from server.store.files import FileStore
from server.store.preferences import PreferenceStore
from server.store.responses import ResponseStore
from server.store.retention import RetentionStore


class Store(PreferenceStore, FeedbackStore, ResponseStore, ChatCompletionStore, FileStore, BatchStore,
            ConversationStore, RetentionStore):
    """Open with `await Store.open(config)`; close with `await store.close()`."""
