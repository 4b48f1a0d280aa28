"""What the store keeps, as the routes see it: one frozen dataclass per
kind of record (their tables: server/store/schema.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pad_core.types import Preference


def prefs_json(preferences: Iterable[Preference]) -> list[dict]:
    return [{"text": p.text, "weight": p.weight} for p in preferences]


def prefs_from_json(raw: str) -> list[Preference]:
    return [Preference(text=p["text"], weight=float(p["weight"])) for p in json.loads(raw)]



# ----------------------------------------------------------------- records


@dataclass(frozen=True)
class Profile:
    user_id: str
    preferences: list[Preference]
    created_at: int
    updated_at: int

    def to_openai(self) -> dict:
        return {
            "object": "user.preferences",
            "user": self.user_id,
            "preferences": prefs_json(self.preferences),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Completion:
    completion_id: str
    choice_index: int
    user_id: str | None
    messages: list[dict[str, str]]
    preferences: list[Preference]
    answer: str
    model: str
    created_at: int
    prompt_key: str
    preference_key: str


@dataclass(frozen=True)
class StoredResponse:
    """A Responses API response kept with `store` (see schema.responses)."""

    response_id: str
    user_id: str | None
    conversation: list[dict[str, str]]
    call_names: dict[str, str]
    input_items: list[dict[str, Any]]
    response: dict[str, Any]
    created_at: int


@dataclass(frozen=True)
class ResponseEvent:
    """One event of a streamed background response (see schema.response_events)."""

    sequence_number: int
    kind: str
    frame: str


@dataclass(frozen=True)
class StoredChatCompletion:
    """A chat completion kept with `store: true` (see schema.chat_completions)."""

    completion_id: str
    user_id: str | None
    model: str
    metadata: dict[str, str]
    messages: list[dict[str, Any]]
    completion: dict[str, Any]
    created_at: int

    def to_openai(self) -> dict:
        """The chat.completion object as it was returned, with its metadata
        as it is now (OpenAI's stored completions carry theirs)."""
        return {**self.completion, "metadata": self.metadata}


@dataclass(frozen=True)
class StoredFile:
    """A file of the Files API (see schema.files), without its bytes."""

    file_id: str
    user_id: str | None
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None = None  # unix seconds; None: kept until deleted

    def to_openai(self) -> dict:
        return {"id": self.file_id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": self.expires_at, "status_details": None}


@dataclass(frozen=True)
class StoredBatch:
    """A batch of the Batch API (see schema.batches): its object as it is
    now, and whether a runner's lease on it is alive."""

    batch_id: str
    user_id: str | None
    batch: dict[str, Any]
    running: bool


@dataclass(frozen=True)
class ClaimedBatch:
    """An orphaned batch whose lease a gateway took, to resume it."""

    stored: StoredBatch
    cancel_requested: bool
    has_scope: bool  # False: no batch_runs row (the batch predates schema v8)
    key_id: str | None  # the key that created it; None: a server without keys
    users: frozenset[str] | None  # who its requests may act for; None: every user
    output_expires_s: int | None  # its result files' expiry after their creation; None: kept until deleted


@dataclass(frozen=True)
class StoredConversation:
    """A Conversations API conversation (see schema.conversations); its
    items are read apart (a conversation may hold many)."""

    conversation_id: str
    user_id: str | None
    metadata: dict[str, str]
    created_at: int

    def to_openai(self) -> dict:
        return {"id": self.conversation_id, "object": "conversation", "created_at": self.created_at,
                "metadata": self.metadata}


ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def new_item_id(kind: str) -> str:
    """A fresh id for an input item of that type (msg_<hex>, fc_<hex> ...)."""
    return f"{ITEM_ID_PREFIXES.get(kind, 'item')}_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Feedback:
    feedback_id: str
    completion_id: str
    choice_index: int
    user_id: str | None
    rating: str | int | None
    preferred_over: str | None
    preferred_over_choice_index: int | None
    comment: str | None
    created_at: int

    def to_openai(self) -> dict:
        return {
            "id": self.feedback_id,
            "object": "feedback",
            "created_at": self.created_at,
            "completion_id": self.completion_id,
            "choice_index": self.choice_index,
            "user": self.user_id,
            "rating": self.rating,
            "preferred_over": self.preferred_over,
            "preferred_over_choice_index": self.preferred_over_choice_index,
            "comment": self.comment,
        }


@dataclass
class ExportResult:
    pairs: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
