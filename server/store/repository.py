"""The store: user preference profiles, completions kept for feedback,
feedback, stored chat completions, stored Responses API responses and
Conversations API conversations, on SQLite (default) or PostgreSQL, through SQLAlchemy's
asyncio API.

Durability: a write method returns only after its transaction committed.
SQLite runs in WAL mode with synchronous=FULL (a commit is fsynced before it
returns, so neither kill -9 nor a power cut loses it) and every write
transaction starts with BEGIN IMMEDIATE (writers queue on the busy timeout
instead of failing on a stale snapshot); PostgreSQL commits are durable with
its default synchronous_commit. Concurrent writers: PUT is an upsert, PATCH
locks the row (SELECT ... FOR UPDATE; SQLite's write lock does the same), as
adding items to a conversation locks the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, event, func, or_, select, true, update
from sqlalchemy.engine.url import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pad_core.errors import InvalidRequestError
from pad_core.types import Preference, RequestLimits, verify_preferences
from pad_core.validation import INT32_MAX, check_int, check_text
from server.store import schema
from server.store.config import StoreConfig, redact_url
from server.store.errors import Forbidden, InvalidInput, NotFound

logger = logging.getLogger(__name__)

THUMBS = {"up": 1, "thumbs_up": 1, "down": 0, "thumbs_down": 0}
AccessCheck = Callable[[str | None], bool]


# ----------------------------------------------------------------- helpers


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def _key(value: Any) -> str:
    return hashlib.sha256(_dumps(value).encode("ascii")).hexdigest()


def _now() -> int:
    return int(time.time())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _store_error(exc: InvalidRequestError) -> InvalidInput:
    return InvalidInput(exc.message, param=exc.param, code=exc.code)


def _check_text(value: Any, param: str) -> None:
    try:
        check_text(value, param)
    except InvalidRequestError as exc:
        raise _store_error(exc) from None


def _check_id(value: Any, param: str) -> None:
    """An id that is a database key: valid Unicode without NUL (PostgreSQL
    text cannot hold one, and would fail the query)."""
    _check_text(value, param)
    if "\x00" in value:
        raise InvalidInput(f"{param} must not contain NUL characters", param=param, code="invalid_text")


def keyable(value: Any, column) -> bool:
    """Whether `value` can name a row by that String column: a non-empty
    string no longer than the column holds, without NUL (PostgreSQL text
    cannot hold one: the query would fail). Any other value names no row."""
    return isinstance(value, str) and 0 < len(value) <= column.type.length and "\x00" not in value


def _check_index(value: Any, param: str) -> int:
    """A choice index: a non-negative integer that fits the INTEGER column."""
    try:
        return check_int(value, param, 0, INT32_MAX)
    except InvalidRequestError:
        raise InvalidInput("choice index must be a non-negative integer", param=param) from None


def _as_preference(item: Any, where: str) -> Preference:
    """One stored-preference item from JSON (a string or {"text", "weight"}),
    a Preference, or the routes' pydantic item; shape only."""
    if isinstance(item, Preference):
        return item
    if isinstance(item, str):
        return Preference(text=item)
    if hasattr(item, "model_dump"):  # the route's WeightedPreference
        item = item.model_dump()
    if isinstance(item, dict):
        unknown = set(item) - {"text", "weight"}
        if unknown:
            raise InvalidInput(f"{where} has unknown field(s): {', '.join(sorted(unknown))}", param=where)
        if "text" not in item:
            raise InvalidInput(f"{where}.text must be a string", param=f"{where}.text")
        return Preference(text=item["text"], weight=item.get("weight", 1.0))
    raise InvalidInput(f"{where} must be a string or a {{\"text\", \"weight\"}} object", param=where)


def validate_preferences(items: Any, config: StoreConfig, param: str = "preferences") -> list[Preference]:
    """A list of preferences from JSON: each a string, {"text", "weight"} or
    a Preference. The same rule as a chat request's (pad_core.types.
    verify_preferences): bounded in count and length, finite bounded
    weights, no repeated text. Texts kept verbatim (not stripped)."""
    if not isinstance(items, list):
        raise InvalidInput(f"'{param}' must be a list of strings or {{\"text\", \"weight\"}} objects", param=param)
    limits = RequestLimits(max_preferences=config.max_preferences, max_preference_chars=config.max_preference_chars)
    try:
        if len(items) > limits.max_preferences:  # the rule's count check, before converting a million items
            verify_preferences([Preference("")] * len(items), limits, param)
        prefs = [_as_preference(item, f"{param}[{index}]") for index, item in enumerate(items)]
        verify_preferences(prefs, limits, param)
    except InvalidRequestError as exc:
        raise _store_error(exc) from None
    return [Preference(text=p.text, weight=float(p.weight)) for p in prefs]


def _prefs_json(preferences: Iterable[Preference]) -> list[dict]:
    return [{"text": p.text, "weight": p.weight} for p in preferences]


def _prefs_from_json(raw: str) -> list[Preference]:
    return [Preference(text=p["text"], weight=float(p["weight"])) for p in json.loads(raw)]


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """[{"role", "content"}] with content flattened to text (text parts joined)."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            message = message.model_dump() if hasattr(message, "model_dump") else dict(message)
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                part.get("text", "") if isinstance(part, dict) else str(getattr(part, "text", "")) for part in content
            )
        out.append({"role": str(message.get("role", "user")), "content": "" if content is None else str(content)})
    return out


def _parse_rating(rating: Any) -> tuple[str, int]:
    if isinstance(rating, str) and rating.lower() in THUMBS:
        return "thumbs", THUMBS[rating.lower()]
    if isinstance(rating, int) and not isinstance(rating, bool) and 1 <= rating <= 5:
        return "scale", rating
    raise InvalidInput(
        "rating must be \"up\", \"down\" (thumbs) or an integer from 1 to 5", param="rating", code="invalid_rating"
    )


def rating_out(kind: str | None, value: int | None) -> str | int | None:
    if kind == "thumbs":
        return "up" if value else "down"
    return value


def rating_score(kind: str, value: int) -> float:
    """Thumbs and 1-5 on one scale in [-1, 1]: up = 1, down = -1, 3 stars = 0."""
    return (1.0 if value else -1.0) if kind == "thumbs" else (value - 3) / 2.0


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
            "preferences": _prefs_json(self.preferences),
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


def preference_text(preferences: Sequence[Preference]) -> str:
    """The single preference string of a training pair: the texts of the
    positively weighted preferences, one per line."""
    return "\n".join(p.text for p in preferences if p.weight > 0)


CLOSE_WRITES_WAIT_S = 10.0  # how long closing waits for the writes whose callers went away


def _runs_to_its_end(write):
    """A store write, once begun, runs to its end even when its caller is
    cancelled (a client that hangs up cancels its stream's task). A
    transaction cut in the middle leaves its connection to the garbage
    collector, invalidated but not closed: on SQLite with the database's
    write lock held, so every writer of every process waits out the busy
    timeout; on PostgreSQL with its row locks held. The caller still sees
    its CancelledError at once; the write's own result is dropped (an error
    logged), and `close()` waits for such writes."""

    @functools.wraps(write)
    async def shielded(self: Store, *args, **kwargs):
        task = asyncio.ensure_future(write(self, *args, **kwargs))
        self._unfinished_writes.add(task)
        task.add_done_callback(self._unfinished_writes.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_a_failed_write)  # nobody waits for its outcome now
            raise

    return shielded


def _log_a_failed_write(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a store write whose caller went away failed", exc_info=task.exception())


# ----------------------------------------------------------------- store


class Store:
    """Open with `await Store.open(config)`; close with `await store.close()`."""

    def __init__(self, engine: AsyncEngine, config: StoreConfig):
        self.engine = engine
        self.config = config
        self.dialect = engine.dialect.name
        self._writer = engine.execution_options(pad_write=True)
        # SQLite allows one writer: queue this process's writers here rather
        # than in SQLite's busy handler (which sleeps in coarse steps).
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._next_prune = 0.0
        self._unfinished_writes: set[asyncio.Task] = set()

    # -- lifecycle

    @classmethod
    async def open(cls, config: StoreConfig | None = None, *, settings: object | None = None) -> Store:
        config = config or StoreConfig.from_settings(settings)
        url = make_url(config.url)
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(url, connect_args={"timeout": 30})
            _sqlite_events(engine)
        else:
            engine = create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
        store = cls(engine, config)
        try:
            async with store._write() as conn:
                found = await conn.run_sync(schema.migrate)
        except BaseException:
            await engine.dispose()
            raise
        if found != schema.LATEST:
            logger.info("database schema migrated from version %d to %d", found, schema.LATEST)
        logger.info("store open: %s (schema v%d)", redact_url(config.url), schema.LATEST)
        return store

    async def close(self) -> None:
        if self._unfinished_writes:  # whose callers went away: a while to end, not forever (a lock held elsewhere)
            _, late = await asyncio.wait(set(self._unfinished_writes), timeout=CLOSE_WRITES_WAIT_S)
            if late:
                logger.warning("closing the store with %d writes unfinished after %.0f s", len(late),
                               CLOSE_WRITES_WAIT_S)
        await self.engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock if self._write_lock is not None else contextlib.nullcontext():
            async with self._writer.begin() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    def _insert(self, table):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def _check_user_id(self, user_id: str) -> None:
        if not isinstance(user_id, str) or not user_id:
            raise InvalidInput("user id must be a non-empty string", param="user_id")
        if len(user_id) > self.config.max_user_id_chars:
            raise InvalidInput(
                f"user id has {len(user_id)} characters, at most {self.config.max_user_id_chars} allowed",
                param="user_id",
            )
        _check_id(user_id, "user_id")

    # -- preference profiles

    async def get_preferences(self, user_id: str) -> Profile:
        """The stored profile; NotFound when the user has none."""
        self._check_user_id(user_id)
        async with self._read() as conn:
            row = (await conn.execute(select(schema.user_profiles).where(schema.user_profiles.c.user_id == user_id))).first()
        if row is None:
            raise NotFound(f"no stored preferences for user {user_id!r}", param="user_id", code="user_not_found")
        return Profile(row.user_id, _prefs_from_json(row.preferences), row.created_at, row.updated_at)

    async def find_preferences(self, user_id: str | None) -> list[Preference] | None:
        """The stored preferences of a user, or None when there is no profile."""
        if not user_id or len(user_id) > self.config.max_user_id_chars:
            return None
        try:
            return (await self.get_preferences(user_id)).preferences
        except (NotFound, InvalidInput):
            return None

    @_runs_to_its_end
    async def put_preferences(self, user_id: str, preferences: Any) -> Profile:
        """Replaces the whole list (creates the profile if needed)."""
        self._check_user_id(user_id)
        prefs = validate_preferences(preferences, self.config)
        now = _now()
        table = schema.user_profiles
        stmt = self._insert(table).values(user_id=user_id, preferences=_dumps(_prefs_json(prefs)), created_at=now, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.user_id],
            set_={"preferences": stmt.excluded.preferences, "updated_at": stmt.excluded.updated_at},
        ).returning(table.c.created_at)
        async with self._write() as conn:
            created = (await conn.execute(stmt)).scalar_one()
        return Profile(user_id, list(prefs), created, now)

    @_runs_to_its_end
    async def patch_preferences(self, user_id: str, add: Any = None, remove: Any = None) -> Profile:
        """Adds preferences (an existing text gets the new weight, in place) and
        removes texts (absent ones are ignored: the PATCH is idempotent).
        NotFound for a user without a profile."""
        self._check_user_id(user_id)
        add_prefs = validate_preferences(add if add is not None else [], self.config, param="add")
        if remove is None:
            remove = []
        if not isinstance(remove, list) or not all(isinstance(t, str) for t in remove):
            raise InvalidInput("'remove' must be a list of preference texts", param="remove")
        table = schema.user_profiles
        async with self._write() as conn:
            row = (
                await conn.execute(select(table).where(table.c.user_id == user_id).with_for_update())
            ).first()
            if row is None:
                raise NotFound(f"no stored preferences for user {user_id!r}", param="user_id", code="user_not_found")
            current = _prefs_from_json(row.preferences)
            drop = set(remove)
            merged = [p for p in current if p.text not in drop]
            position = {p.text: i for i, p in enumerate(merged)}
            for pref in add_prefs:
                if pref.text in position:
                    merged[position[pref.text]] = pref
                else:
                    position[pref.text] = len(merged)
                    merged.append(pref)
            if len(merged) > self.config.max_preferences:
                raise InvalidInput(
                    f"too many preferences: the result would have {len(merged)}, "
                    f"at most {self.config.max_preferences} allowed",
                    param="add",
                    code="too_many_preferences",
                )
            now = _now()
            await conn.execute(
                update(table).where(table.c.user_id == user_id).values(preferences=_dumps(_prefs_json(merged)), updated_at=now)
            )
        return Profile(user_id, merged, row.created_at, now)

    @_runs_to_its_end
    async def delete_preferences(self, user_id: str) -> None:
        self._check_user_id(user_id)
        table = schema.user_profiles
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(table.c.user_id == user_id))
        if result.rowcount == 0:
            raise NotFound(f"no stored preferences for user {user_id!r}", param="user_id", code="user_not_found")

    # -- completions

    @property
    def keeps_completions(self) -> bool:
        return self.config.feedback_retention_days > 0

    @_runs_to_its_end
    async def record_completion(
        self,
        completion_id: str,
        *,
        messages: Sequence[Any],
        answers: Sequence[str] | str,
        preferences: Sequence[Preference] | None = None,
        user: str | None = None,
        model: str = "",
        created: int | None = None,
    ) -> bool:
        """Keeps a completion (one row per choice) for later feedback; returns
        False when retention is 0 (nothing is kept). Re-recording an id is a
        no-op. Prunes expired completions now and then."""
        if not self.keeps_completions:
            return False
        if isinstance(answers, str):
            answers = [answers]
        chat = normalize_messages(messages)
        prefs = _prefs_json(preferences or [])
        created = int(created if created is not None else _now())
        rows = [
            {
                "completion_id": completion_id,
                "choice_index": index,
                "user_id": user or None,
                "messages": _dumps(chat),
                "prompt_key": _key(chat),
                "preferences": _dumps(prefs),
                "preference_key": _key(prefs),
                "answer": _dumps(answer),
                "model": model or "",
                "created_at": created,
            }
            for index, answer in enumerate(answers)
        ]
        if not rows:
            return False
        stmt = self._insert(schema.completions).on_conflict_do_nothing()
        async with self._write() as conn:
            await conn.execute(stmt, rows)
        await self._maybe_prune()
        return True

    async def get_completion(self, completion_id: str, choice_index: int = 0) -> Completion:
        async with self._read() as conn:
            row = await self._completion_row(conn, completion_id, choice_index)
        return _completion(row)

    async def _completion_row(self, conn, completion_id: Any, choice_index: Any, param: str = "completion_id"):
        if not isinstance(completion_id, str) or not completion_id or len(completion_id) > 128:
            raise InvalidInput(f"'{param}' must be a completion id (a non-empty string)", param=param)
        _check_id(completion_id, param)
        choice_index = _check_index(choice_index, param)
        table = schema.completions
        row = (
            await conn.execute(
                select(table).where(and_(table.c.completion_id == completion_id, table.c.choice_index == choice_index))
            )
        ).first()
        if row is None:
            what = f"choice {choice_index} of " if choice_index else ""
            raise NotFound(
                f"no stored completion {what}{completion_id!r} (unknown, or older than the "
                f"{self.config.feedback_retention_days:g}-day retention)",
                param=param,
                code="completion_not_found",
            )
        return row

    async def _maybe_prune(self) -> None:
        if time.monotonic() >= self._next_prune:
            await self.prune()

    @_runs_to_its_end
    async def prune(self, now: float | None = None) -> int:
        """Deletes completions older than the feedback retention, and their
        feedback, responses older than the responses retention, and files
        past their expiry."""
        now = now if now is not None else time.time()
        retentions = [days * 86400.0 for days in (self.config.feedback_retention_days,
                                                  self.config.responses_retention_days,
                                                  self.config.chat_completions_retention_days) if days > 0]
        self._next_prune = time.monotonic() + max(60.0, min(3600.0, min(retentions, default=3600.0) / 10))
        c, f, r = schema.completions, schema.feedback, schema.responses
        async with self._write() as conn:
            cutoff = int(now - self.config.feedback_retention_days * 86400.0)
            result = await conn.execute(delete(c).where(c.c.created_at < cutoff))
            if result.rowcount:
                alive = select(c.c.completion_id)
                await conn.execute(
                    delete(f).where(
                        or_(
                            f.c.completion_id.not_in(alive),
                            and_(f.c.other_completion_id.is_not(None), f.c.other_completion_id.not_in(alive)),
                        )
                    )
                )
            cutoff = int(now - self.config.responses_retention_days * 86400.0)
            events = schema.response_events  # first, while their responses say which (by the indexes)
            await conn.execute(delete(events).where(events.c.response_id.in_(
                select(r.c.response_id).where(r.c.created_at < cutoff))))
            responses = await conn.execute(delete(r).where(r.c.created_at < cutoff))
            kept = await self._prune_chat_completions(conn, int(now - self.config.chat_completions_retention_days
                                                                 * 86400.0))
            files = await self._prune_files(conn, int(now))
        if files:
            logger.info("pruned %d expired files", files)
        if result.rowcount:
            logger.info("pruned %d expired completion rows", result.rowcount)
        if responses.rowcount:
            logger.info("pruned %d expired responses", responses.rowcount)
        if kept:
            logger.info("pruned %d expired stored chat completions", kept)
        return result.rowcount

    @staticmethod
    async def _prune_files(conn: AsyncConnection, now: int) -> int:
        """Deletes the files past their expiry, but a running batch's input
        (a gateway resuming it reads it again)."""
        table, batches = schema.files, schema.batches
        running = [json.loads(row.batch)["input_file_id"] for row in await conn.execute(
            select(batches.c.batch).where(batches.c.expires_at_ms.is_not(None)))]
        result = await conn.execute(delete(table).where(and_(table.c.expires_at <= now,
                                                             table.c.file_id.not_in(running))))
        return result.rowcount

    @staticmethod
    async def _prune_chat_completions(conn: AsyncConnection, cutoff: int) -> int:
        # The completions first, then their pairs: every writer locks a completion before its pairs
        # (opposite orders deadlocked update against delete on PostgreSQL), and the pairs' delete, a
        # statement of its own, sees the pairs an update committed meanwhile.
        table, pairs = schema.chat_completions, schema.chat_completion_metadata
        expired = [row.completion_id for row in await conn.execute(
            delete(table).where(table.c.created_at < cutoff).returning(table.c.completion_id))]
        for start in range(0, len(expired), 500):
            await conn.execute(delete(pairs).where(pairs.c.completion_id.in_(expired[start:start + 500])))
        return len(expired)

    # -- responses (the Responses API's `store`)

    @property
    def keeps_responses(self) -> bool:
        return self.config.responses_retention_days > 0

    @_runs_to_its_end
    async def record_response(
        self,
        response: dict[str, Any],
        *,
        user: str | None,
        conversation: Sequence[dict[str, str]],
        call_names: dict[str, str],
        input_items: Sequence[dict[str, Any]],
        replace: bool = False,
    ) -> bool:
        """Keeps a response object, with what continuing it needs; returns
        False when the retention is 0 (nothing is kept). A response kept
        already stays as it was, unless `replace` (a background response's
        later states: its object and conversation, not its input)."""
        if not self.keeps_responses:
            return False
        row = {
            "response_id": response["id"],
            "user_id": user or None,
            "conversation": _dumps(normalize_messages(conversation)),
            "call_names": _dumps(call_names),
            "input_items": _dumps(list(input_items)),
            "response": _dumps(response),
            "created_at": int(response.get("created_at") or _now()),
        }
        table = schema.responses
        async with self._write() as conn:
            if replace:  # an update, not an upsert: a response deleted meanwhile stays deleted
                await conn.execute(update(table).where(table.c.response_id == row["response_id"]).values(
                    conversation=row["conversation"], call_names=row["call_names"], response=row["response"]))
            else:
                await conn.execute(self._insert(table).on_conflict_do_nothing(), [row])
        await self._maybe_prune()
        return True

    async def find_response(self, response_id: str) -> StoredResponse | None:
        """The kept response of that id; None when unknown or expired."""
        return (await self.find_responses([response_id])).get(response_id)

    async def find_responses(self, response_ids: Iterable[str]) -> dict[str, StoredResponse]:
        """The kept responses among `response_ids`, by id; unknown and expired
        ones (past the retention, pruned or not yet) are left out. A query
        per 500 ids (a request may reference thousands of items)."""
        table = schema.responses
        ids = sorted({i for i in response_ids if keyable(i, table.c.response_id)})
        alive = int(time.time() - self.config.responses_retention_days * 86400.0)
        found: dict[str, StoredResponse] = {}
        async with self._read() as conn:
            for start in range(0, len(ids), 500):
                rows = await conn.execute(select(table).where(and_(
                    table.c.response_id.in_(ids[start:start + 500]), table.c.created_at >= alive)))
                found.update((row.response_id, _stored_response(row)) for row in rows)
        return found

    @_runs_to_its_end
    async def delete_response(self, response_id: str) -> bool:
        table, events = schema.responses, schema.response_events
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(table.c.response_id == response_id))
            await conn.execute(delete(events).where(events.c.response_id == response_id))
        return result.rowcount > 0

    # -- a streamed background response's events (server/background_events.py)

    @_runs_to_its_end
    async def append_response_events(self, response_id: str, events: Sequence[Any]) -> None:
        """Adds events (each with sequence_number, kind, frame) after those
        kept; one already kept under its number stays as it was."""
        rows = [{"response_id": response_id, "sequence_number": e.sequence_number, "kind": e.kind,
                 "frame": e.frame} for e in events]
        if not rows:
            return
        responses = schema.responses
        async with self._write() as conn:
            # Only while the response is kept: a run on one gateway may still write as another deletes
            # it (its row locked here, so the delete and this write take turns on PostgreSQL).
            kept = (await conn.execute(select(responses.c.response_id).where(responses.c.response_id == response_id)
                                       .with_for_update())).first()
            if kept is not None:
                await conn.execute(self._insert(schema.response_events).on_conflict_do_nothing(), rows)

    async def response_events(self, response_id: str, *, after: int = -1, limit: int = 500) -> list[ResponseEvent]:
        """The kept events numbered after `after`, in order, at most `limit`."""
        table = schema.response_events
        async with self._read() as conn:
            rows = await conn.execute(select(table).where(and_(
                table.c.response_id == response_id, table.c.sequence_number > after))
                .order_by(table.c.sequence_number).limit(limit))
            return [ResponseEvent(row.sequence_number, row.kind, row.frame) for row in rows]

    async def last_response_event(self, response_id: str) -> ResponseEvent | None:
        """The response's last kept event (None: none)."""
        table = schema.response_events
        async with self._read() as conn:
            row = (await conn.execute(select(table).where(table.c.response_id == response_id)
                                      .order_by(table.c.sequence_number.desc()).limit(1))).first()
        return None if row is None else ResponseEvent(row.sequence_number, row.kind, row.frame)

    # -- stored chat completions (`store: true` on /v1/chat/completions)

    @property
    def keeps_chat_completions(self) -> bool:
        return self.config.chat_completions_retention_days > 0

    def _alive_chat_completions(self) -> Any:
        """The condition a kept chat completion within its retention meets
        (one past it is gone at once, pruned or not yet)."""
        cutoff = int(time.time() - self.config.chat_completions_retention_days * 86400.0)
        return schema.chat_completions.c.created_at >= cutoff

    @_runs_to_its_end
    async def record_chat_completion(self, completion: dict[str, Any], *, user: str | None,
                                     messages: Sequence[dict[str, Any]], metadata: dict[str, str]) -> bool:
        """Keeps a chat.completion object and its request's messages; returns
        False when the retention is 0 (nothing is kept). Re-recording an id
        is a no-op."""
        if not self.keeps_chat_completions:
            return False
        row = {
            "completion_id": completion["id"],
            "user_id": user or None,
            "model": completion.get("model") or "",
            "metadata": _dumps(metadata),
            "messages": _dumps(list(messages)),
            "completion": _dumps(completion),
            "created_at": int(completion.get("created") or _now()),
        }
        pairs = [{"completion_id": completion["id"], "key": key, "value": value} for key, value in metadata.items()]
        async with self._write() as conn:
            result = await conn.execute(self._insert(schema.chat_completions).on_conflict_do_nothing(), [row])
            if pairs and result.rowcount:
                await conn.execute(schema.chat_completion_metadata.insert(), pairs)
        await self._maybe_prune()
        return True

    async def find_chat_completion(self, completion_id: str) -> StoredChatCompletion | None:
        """The kept chat completion of that id; None when unknown or expired."""
        table = schema.chat_completions
        if not keyable(completion_id, table.c.completion_id):
            return None
        async with self._read() as conn:
            row = (await conn.execute(select(table).where(and_(
                table.c.completion_id == completion_id, self._alive_chat_completions())))).first()
        return _stored_chat_completion(row) if row is not None else None

    async def list_chat_completions(self, *, users: frozenset[str] | None = None, model: str | None = None,
                                    metadata: dict[str, str] | None = None, after: str | None = None,
                                    limit: int = 20, descending: bool = False
                                    ) -> tuple[list[StoredChatCompletion], bool]:
        """A page of the kept chat completions, oldest first (or newest),
        of `users` (None: everyone's), of `model`, holding every pair of
        `metadata`, after the completion `after`; and whether more follow."""
        table, pairs = schema.chat_completions, schema.chat_completion_metadata
        conditions = [self._alive_chat_completions()]
        if users is not None:
            conditions.append(table.c.user_id.in_(sorted(users)))
        visible = len(conditions)
        if model is not None:
            conditions.append(table.c.model == model)
        if metadata:
            # One subquery however many pairs (one EXISTS a pair made PostgreSQL's planner crawl): a
            # completion holds a key once, so matching as many rows as pairs is matching them all.
            matching = (select(pairs.c.completion_id)
                        .where(or_(*(and_(pairs.c.key == key, pairs.c.value == value) for key, value in metadata.items())))
                        .group_by(pairs.c.completion_id).having(func.count() == len(metadata)))
            conditions.append(table.c.completion_id.in_(matching))
        async with self._read() as conn:
            if after is not None:
                # Found whatever its metadata is now: a page's last completion updated out of the filter
                # still places the next page (only another user's is unknown).
                cursor = None if not keyable(after, table.c.completion_id) else (await conn.execute(
                    select(table.c.created_at, table.c.seq).where(and_(table.c.completion_id == after,
                                                                       *conditions[:visible])))).first()
                if cursor is None:
                    raise InvalidInput(f"after: no chat completion {after[:80]!r} in this list", param="after",
                                       code="invalid_value")
                created, seq = cursor
                if descending:
                    conditions.append(or_(table.c.created_at < created,
                                          and_(table.c.created_at == created, table.c.seq < seq)))
                else:
                    conditions.append(or_(table.c.created_at > created,
                                          and_(table.c.created_at == created, table.c.seq > seq)))
            order = (table.c.created_at.desc(), table.c.seq.desc()) if descending else (table.c.created_at,
                                                                                          table.c.seq)
            rows = (await conn.execute(select(table).where(and_(*conditions)).order_by(*order).limit(limit + 1))).all()
        return [_stored_chat_completion(row) for row in rows[:limit]], len(rows) > limit

    @_runs_to_its_end
    async def update_chat_completion(self, completion_id: str, metadata: dict[str, str]
                                     ) -> StoredChatCompletion | None:
        """Replaces its metadata (as OpenAI's update does); None when it is gone."""
        table, pairs = schema.chat_completions, schema.chat_completion_metadata
        async with self._write() as conn:
            result = await conn.execute(update(table).where(table.c.completion_id == completion_id)
                                        .values(metadata=_dumps(metadata)))
            if not result.rowcount:
                return None
            await conn.execute(delete(pairs).where(pairs.c.completion_id == completion_id))
            if metadata:
                await conn.execute(pairs.insert(), [{"completion_id": completion_id, "key": key, "value": value}
                                                    for key, value in metadata.items()])
            row = (await conn.execute(select(table).where(table.c.completion_id == completion_id))).first()
        return _stored_chat_completion(row)

    @_runs_to_its_end
    async def delete_chat_completion(self, completion_id: str) -> bool:
        table, pairs = schema.chat_completions, schema.chat_completion_metadata
        async with self._write() as conn:  # the completion first, then its pairs (see _prune_chat_completions)
            result = await conn.execute(delete(table).where(table.c.completion_id == completion_id))
            await conn.execute(delete(pairs).where(pairs.c.completion_id == completion_id))
        return result.rowcount > 0

    # -- background responses (`background: true`): their runners' leases

    @_runs_to_its_end
    async def begin_background(self, response_id: str, token: str, lease_s: float) -> None:
        async with self._write() as conn:
            await conn.execute(schema.background_responses.insert().values(
                response_id=response_id, token=token, expires_at_ms=_now_ms() + _ms(lease_s), cancel_requested=0))

    @_runs_to_its_end
    async def renew_background(self, response_id: str, token: str, lease_s: float) -> bool | None:
        """Extends the runner's lease; whether a cancel was asked meanwhile
        (None: the run is no longer this runner's)."""
        table = schema.background_responses
        return await self._renew_lease(table, table.c.response_id == response_id, token, lease_s)

    async def _renew_lease(self, table, this_run, token: str, lease_s: float) -> bool | None:
        """A run's lease (background_responses', batches') extended if `token`
        holds it; whether a cancel was asked (None: the token holds it no more)."""
        mine = and_(this_run, table.c.token == token)
        async with self._write() as conn:
            result = await conn.execute(update(table).where(mine).values(expires_at_ms=_now_ms() + _ms(lease_s)))
            if not result.rowcount:
                return None
            return bool((await conn.execute(select(table.c.cancel_requested).where(mine))).scalar())

    async def _ask_cancel(self, table, this_run) -> bool:
        """Flags a background response's run for its runner, on whatever
        gateway, to cancel; False when no live lease holds it."""
        async with self._write() as conn:
            result = await conn.execute(update(table).where(and_(this_run, table.c.expires_at_ms >= _now_ms()))
                                        .values(cancel_requested=1))
        return result.rowcount > 0

    @_runs_to_its_end
    async def end_background(self, response_id: str, token: str) -> None:
        table = schema.background_responses
        async with self._write() as conn:
            await conn.execute(delete(table).where(and_(table.c.response_id == response_id, table.c.token == token)))

    async def background_running(self, response_id: str) -> bool:
        """Whether a runner, on whatever gateway, holds the response's lease."""
        table = schema.background_responses
        async with self._read() as conn:
            return (await conn.execute(select(table.c.response_id).where(and_(
                table.c.response_id == response_id, table.c.expires_at_ms >= _now_ms())))).first() is not None

    @_runs_to_its_end
    async def request_background_cancel(self, response_id: str) -> bool:
        """Asks the runner of a background response, on whatever gateway, to
        cancel it; False when none runs it."""
        table = schema.background_responses
        return await self._ask_cancel(table, table.c.response_id == response_id)

    @_runs_to_its_end
    async def settle_abandoned_response(self, response_id: str, settled: Callable[[dict[str, Any]], dict[str, Any]]
                                        ) -> StoredResponse | None:
        """The kept response; one still queued or in progress whose runner's
        lease ran out (its gateway stopped) is first replaced by
        `settled(response)` (a failed one). Read and written in one write
        transaction, so a runner that finished meanwhile is never undone."""
        table, runs = schema.responses, schema.background_responses
        async with self._write() as conn:
            row = (await conn.execute(select(table).where(table.c.response_id == response_id)
                                      .with_for_update())).first()
            if row is None:
                return None
            kept = _stored_response(row)
            if kept.response.get("status") not in ("queued", "in_progress"):
                return kept
            alive = (await conn.execute(select(runs.c.response_id).where(and_(
                runs.c.response_id == response_id, runs.c.expires_at_ms >= _now_ms())))).first()
            if alive is not None:
                return kept
            response = settled(kept.response)
            await conn.execute(update(table).where(table.c.response_id == response_id)
                               .values(response=_dumps(response)))
            await conn.execute(delete(runs).where(runs.c.response_id == response_id))
        return dataclasses.replace(kept, response=response)

    # -- files (the Files API; kept until deleted or until they expire)

    @_runs_to_its_end
    async def record_file(self, file: StoredFile, content: bytes) -> None:
        async with self._write() as conn:
            await conn.execute(schema.files.insert().values(**_file_row(file, content)))
        await self._maybe_prune()

    async def find_file(self, file_id: str) -> StoredFile | None:
        """The file (None when unknown, or expired: gone at once, pruned or not yet)."""
        table = schema.files
        if not keyable(file_id, table.c.file_id):
            return None
        columns = [c for c in table.c if c.name not in ("content", "seq")]
        async with self._read() as conn:
            row = (await conn.execute(select(*columns).where(and_(table.c.file_id == file_id,
                                                                  _file_alive(_now()))))).first()
        return None if row is None else _stored_file(row)

    async def file_content(self, file_id: str, *, expired_too: bool = False) -> bytes | None:
        """The file's bytes; an expired file's only with `expired_too` (a
        running batch's input, which pruning keeps)."""
        table = schema.files
        if not keyable(file_id, table.c.file_id):
            return None
        alive = true() if expired_too else _file_alive(_now())
        async with self._read() as conn:
            content = (await conn.execute(select(table.c.content).where(and_(table.c.file_id == file_id, alive)))
                       ).scalar()
        return None if content is None else bytes(content)

    async def list_files(self, *, users: frozenset[str] | None, purpose: str | None, after: str | None,
                         limit: int, descending: bool, hidden_purposes: Collection[str] = ()
                         ) -> tuple[list[StoredFile], bool]:
        table = schema.files
        conditions = [] if users is None else [table.c.user_id.in_(sorted(users))]
        if hidden_purposes:
            conditions.append(table.c.purpose.notin_(sorted(hidden_purposes)))
        async with self._read() as conn:
            if after is not None:
                cursor = None if not keyable(after, table.c.file_id) else (await conn.execute(
                    select(table.c.created_at, table.c.seq).where(and_(table.c.file_id == after, *conditions)))).first()
                if cursor is None:
                    raise InvalidInput(f"after: no file {after[:80]!r} in this list", param="after",
                                       code="invalid_value")
                conditions.append(_after(table.c.created_at, table.c.seq, *cursor, descending))
            if purpose is not None:
                conditions.append(table.c.purpose == purpose)
            conditions.append(_file_alive(_now()))
            order = ((table.c.created_at.desc(), table.c.seq.desc()) if descending
                     else (table.c.created_at, table.c.seq))
            columns = [c for c in table.c if c.name != "content"]
            rows = (await conn.execute(select(*columns).where(and_(true(), *conditions)).order_by(*order)
                                       .limit(limit + 1))).all()
        files = [_stored_file(row) for row in rows]
        return files[:limit], len(files) > limit

    @_runs_to_its_end
    async def delete_file(self, file_id: str) -> bool:
        table = schema.files
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(table.c.file_id == file_id))
        return result.rowcount > 0

    # -- batches (the Batch API): their objects, their runners' leases, their results so far

    @_runs_to_its_end
    async def create_batch(self, batch: dict[str, Any], *, user: str | None, token: str, lease_s: float,
                           key_id: str | None, users: frozenset[str] | None,
                           output_expires_s: int | None = None) -> None:
        """Stores a new batch, its runner's lease, and the key scope its
        requests run with (see schema.batch_runs)."""
        async with self._write() as conn:
            await conn.execute(schema.batches.insert().values(
                batch_id=batch["id"], user_id=user, batch=_dumps(batch), created_at=batch["created_at"],
                token=token, expires_at_ms=_now_ms() + _ms(lease_s), cancel_requested=0))
            await conn.execute(schema.batch_runs.insert().values(
                batch_id=batch["id"], key_id=key_id, users=None if users is None else _dumps(sorted(users)),
                output_expires_s=output_expires_s))

    async def find_batch(self, batch_id: str) -> StoredBatch | None:
        table = schema.batches
        if not keyable(batch_id, table.c.batch_id):
            return None
        async with self._read() as conn:
            row = (await conn.execute(select(table).where(table.c.batch_id == batch_id))).first()
        return None if row is None else _stored_batch(row)

    async def list_batches(self, *, users: frozenset[str] | None, after: str | None, limit: int,
                           before: str | None = None, id_prefix: str | None = None
                           ) -> tuple[list[StoredBatch], bool]:
        """A page of batches, newest first (as OpenAI and Anthropic list
        them): those after `after`, or those just before `before` (the page
        before it), whose id starts with `id_prefix` when given; and whether
        more lie beyond the page in its direction."""
        table = schema.batches
        conditions = [] if users is None else [table.c.user_id.in_(sorted(users))]
        if id_prefix is not None:
            conditions.append(table.c.batch_id.startswith(id_prefix, autoescape=True))
        backwards = before is not None  # the page just before `before`: read oldest first from it, then turned
        async with self._read() as conn:
            if after is not None:  # older than it (the list is newest first)
                cursor = await self._batch_cursor(conn, after, conditions, "after")
                conditions.append(_after(table.c.created_at, table.c.seq, *cursor, descending=True))
            if before is not None:  # newer than it
                cursor = await self._batch_cursor(conn, before, conditions, "before")
                conditions.append(_after(table.c.created_at, table.c.seq, *cursor, descending=False))
            order = (table.c.created_at.asc(), table.c.seq.asc()) if backwards else \
                (table.c.created_at.desc(), table.c.seq.desc())
            rows = (await conn.execute(select(table).where(and_(true(), *conditions))
                                       .order_by(*order).limit(limit + 1))).all()
        batches = [_stored_batch(row) for row in rows]
        page = batches[:limit]
        return (page[::-1] if backwards else page), len(batches) > limit

    @staticmethod
    async def _batch_cursor(conn: AsyncConnection, batch_id: str, conditions: list, param: str) -> tuple[int, int]:
        """(created_at, seq) of a batch in the list `conditions` select: where a page starts."""
        table = schema.batches
        cursor = None if not keyable(batch_id, table.c.batch_id) else (await conn.execute(
            select(table.c.created_at, table.c.seq).where(and_(table.c.batch_id == batch_id, *conditions)))).first()
        if cursor is None:
            raise InvalidInput(f"{param}: no batch {batch_id[:80]!r} in this list", param=param, code="invalid_value")
        return tuple(cursor)

    async def delete_batch(self, batch_id: str) -> bool:
        """Deletes an ended batch's object and what its run kept (not its
        files: the caller deletes those it owns)."""
        async with self._write() as conn:
            result = await conn.execute(delete(schema.batches).where(schema.batches.c.batch_id == batch_id))
            for table in (schema.batch_runs, schema.batch_results):
                await conn.execute(delete(table).where(table.c.batch_id == batch_id))
        return result.rowcount > 0

    @_runs_to_its_end
    async def update_batch(self, batch: dict[str, Any], token: str,
                           results: Sequence[tuple[int, bool, str]] = ()) -> bool:
        """Stores the batch's new state and its new results ((line, ok,
        JSON line) each), in one transaction, if `token` still holds its
        run; False (nothing stored) when it does not."""
        table = schema.batches
        async with self._write() as conn:
            result = await conn.execute(update(table).where(and_(table.c.batch_id == batch["id"],
                                                                 table.c.token == token))
                                        .values(batch=_dumps(batch)))
            if not result.rowcount:
                return False
            if results:
                await conn.execute(schema.batch_results.insert(), [
                    {"batch_id": batch["id"], "line": line, "ok": int(ok), "result": text}
                    for line, ok, text in results])
        return True

    async def batch_progress(self, batch_id: str) -> tuple[int, int, int]:
        """The results stored so far: (the last line answered, how many 2xx,
        how many not)."""
        table = schema.batch_results
        async with self._read() as conn:
            row = (await conn.execute(select(func.max(table.c.line), func.count(), func.sum(table.c.ok))
                                      .where(table.c.batch_id == batch_id))).first()
        last, count, ok = row
        return last or 0, int(ok or 0), int(count - (ok or 0))

    async def batch_results(self, batch_id: str, *, ok: bool, after_line: int, limit: int
                            ) -> list[tuple[int, str]]:
        """A page of the batch's stored results of one kind, in input order:
        (line, JSON line) each."""
        table = schema.batch_results
        async with self._read() as conn:
            rows = (await conn.execute(select(table.c.line, table.c.result)
                                       .where(and_(table.c.batch_id == batch_id, table.c.ok == int(ok),
                                                   table.c.line > after_line))
                                       .order_by(table.c.line).limit(limit))).all()
        return [(row.line, row.result) for row in rows]

    @_runs_to_its_end
    async def end_batch(self, batch: dict[str, Any], token: str, files: Sequence[tuple[StoredFile, bytes]]) -> bool:
        """The batch's end, in one transaction: its result files recorded,
        its last state stored, its lease and stored results dropped; False
        (nothing stored) when `token` no longer holds its run."""
        table = schema.batches
        async with self._write() as conn:
            result = await conn.execute(update(table).where(and_(table.c.batch_id == batch["id"],
                                                                 table.c.token == token))
                                        .values(batch=_dumps(batch), token=None, expires_at_ms=None))
            if not result.rowcount:
                return False
            for file, content in files:
                await conn.execute(schema.files.insert().values(**_file_row(file, content)))
            await conn.execute(delete(schema.batch_results).where(schema.batch_results.c.batch_id == batch["id"]))
            await conn.execute(delete(schema.batch_runs).where(schema.batch_runs.c.batch_id == batch["id"]))
        return True

    @_runs_to_its_end
    async def renew_batch(self, batch_id: str, token: str, lease_s: float) -> bool | None:
        """Extends the runner's lease; whether a cancel was asked (None: the
        run is no longer this runner's)."""
        table = schema.batches
        return await self._renew_lease(table, table.c.batch_id == batch_id, token, lease_s)

    @_runs_to_its_end
    async def release_batch(self, batch_id: str, token: str) -> None:
        """Gives up a running batch's lease (its gateway stops): any gateway
        may resume it at once."""
        table = schema.batches
        async with self._write() as conn:
            await conn.execute(update(table).where(and_(table.c.batch_id == batch_id, table.c.token == token))
                               .values(token=None, expires_at_ms=0))

    async def orphaned_batches(self, limit: int = 100) -> list[str]:
        """Running batches that no runner holds: their lease ran out (the
        gateway died) or was released (it stopped)."""
        table = schema.batches
        async with self._read() as conn:
            rows = (await conn.execute(select(table.c.batch_id).where(and_(
                table.c.expires_at_ms.is_not(None), table.c.expires_at_ms < _now_ms()))
                .order_by(table.c.expires_at_ms).limit(limit))).all()
        return [row.batch_id for row in rows]

    @_runs_to_its_end
    async def claim_batch(self, batch_id: str, token: str, lease_s: float) -> ClaimedBatch | None:
        """Takes an orphaned batch's lease for `token`, if no runner holds it
        (one gateway wins a race); the batch, whether a cancel was asked,
        and the key scope it runs with. None: not orphaned (any more)."""
        table, runs = schema.batches, schema.batch_runs
        orphaned = and_(table.c.batch_id == batch_id, table.c.expires_at_ms.is_not(None),
                        table.c.expires_at_ms < _now_ms())
        async with self._write() as conn:
            result = await conn.execute(update(table).where(orphaned)
                                        .values(token=token, expires_at_ms=_now_ms() + _ms(lease_s)))
            if not result.rowcount:
                return None
            row = (await conn.execute(select(table).where(table.c.batch_id == batch_id))).first()
            scope = (await conn.execute(select(runs).where(runs.c.batch_id == batch_id))).first()
        users = None if scope is None or scope.users is None else frozenset(json.loads(scope.users))
        return ClaimedBatch(_stored_batch(row), bool(row.cancel_requested), scope is not None,
                            None if scope is None else scope.key_id, users,
                            None if scope is None else scope.output_expires_s)

    @_runs_to_its_end
    async def request_batch_cancel(self, batch_id: str) -> bool:
        """Asks the batch's runner, on whatever gateway (or the one that
        resumes it), to cancel it; False when it is not running. Until the
        runner has ended it, the batch reads `cancelling`."""
        table = schema.batches
        async with self._write() as conn:  # the time of the first ask: the batch reads `cancelling` since then
            result = await conn.execute(update(table).where(and_(table.c.batch_id == batch_id,
                                                                 table.c.expires_at_ms.is_not(None)))
                                        .values(cancel_requested=func.coalesce(
                                            func.nullif(table.c.cancel_requested, 0), _now())))
        return result.rowcount > 0

    # -- conversations (the Conversations API; kept until deleted)

    @_runs_to_its_end
    async def create_conversation(self, *, user: str | None, metadata: dict[str, str],
                                  items: Sequence[dict[str, Any]] = ()) -> tuple[StoredConversation, list[dict]]:
        """A new conversation holding `items` (each with an id); returns it
        and its items as kept."""
        conversation = StoredConversation(f"conv_{uuid.uuid4().hex}", user or None, dict(metadata), _now())
        async with self._write() as conn:
            await conn.execute(schema.conversations.insert().values(
                conversation_id=conversation.conversation_id, user_id=conversation.user_id,
                metadata=_dumps(conversation.metadata), created_at=conversation.created_at))
            kept = await self._append_items(conn, conversation.conversation_id, items)
        return conversation, kept

    async def find_conversation(self, conversation_id: str) -> StoredConversation | None:
        table = schema.conversations
        if not keyable(conversation_id, table.c.conversation_id):
            return None
        async with self._read() as conn:
            row = (await conn.execute(select(table).where(table.c.conversation_id == conversation_id))).first()
        return _stored_conversation(row) if row is not None else None

    @_runs_to_its_end
    async def update_conversation(self, conversation_id: str, metadata: dict[str, str]) -> StoredConversation | None:
        """Replaces its metadata (as OpenAI's update does); None when it is gone."""
        table = schema.conversations
        async with self._write() as conn:
            await conn.execute(update(table).where(table.c.conversation_id == conversation_id)
                               .values(metadata=_dumps(metadata)))
            row = (await conn.execute(select(table).where(table.c.conversation_id == conversation_id))).first()
        return _stored_conversation(row) if row is not None else None

    @_runs_to_its_end
    async def delete_conversation(self, conversation_id: str) -> bool:
        items, table, turns = schema.conversation_items, schema.conversations, schema.conversation_turns
        async with self._write() as conn:
            # Locked first: items being added meanwhile are committed (and deleted) or never added.
            await conn.execute(select(table.c.conversation_id)
                               .where(table.c.conversation_id == conversation_id).with_for_update())
            await conn.execute(delete(items).where(items.c.conversation_id == conversation_id))
            await conn.execute(delete(turns).where(turns.c.conversation_id == conversation_id))
            result = await conn.execute(delete(table).where(table.c.conversation_id == conversation_id))
        return result.rowcount > 0

    @_runs_to_its_end
    async def take_turn(self, conversation_id: str, token: str, lease_s: float) -> bool | None:
        """Takes the conversation's turn for `token` for `lease_s` seconds:
        True; False while another holder's lease runs; None when the
        conversation is gone."""
        table, turns = schema.conversations, schema.conversation_turns
        async with self._write() as conn:
            # The conversation's row locked: two gateways taking its turn at once take turns.
            found = await conn.execute(select(table.c.conversation_id)
                                       .where(table.c.conversation_id == conversation_id).with_for_update())
            if found.first() is None:
                return None
            now = _now_ms()
            held = (await conn.execute(select(turns.c.expires_at_ms)
                                       .where(turns.c.conversation_id == conversation_id))).scalar()
            if held is not None and held > now:
                return False
            await conn.execute(delete(turns).where(turns.c.conversation_id == conversation_id))
            await conn.execute(turns.insert().values(conversation_id=conversation_id, token=token,
                                                     expires_at_ms=now + _ms(lease_s)))
        return True

    @_runs_to_its_end
    async def renew_turn(self, conversation_id: str, token: str, lease_s: float) -> bool:
        """Extends `token`'s turn by `lease_s` seconds from now; False when
        it holds the turn no longer (its lease ran out and another took it,
        or the conversation was deleted)."""
        turns = schema.conversation_turns
        async with self._write() as conn:
            result = await conn.execute(update(turns).where(and_(
                turns.c.conversation_id == conversation_id, turns.c.token == token))
                .values(expires_at_ms=_now_ms() + _ms(lease_s)))
        return result.rowcount > 0

    @_runs_to_its_end
    async def end_turn(self, conversation_id: str, token: str) -> None:
        """Gives `token`'s turn back (nothing when it holds it no longer)."""
        turns = schema.conversation_turns
        async with self._write() as conn:
            await conn.execute(delete(turns).where(and_(
                turns.c.conversation_id == conversation_id, turns.c.token == token)))

    @_runs_to_its_end
    async def add_conversation_items(self, conversation_id: str, items: Sequence[dict[str, Any]]) -> list[dict] | None:
        """Appends `items` (each with an id) to a conversation, in order;
        returns them as kept (an id the conversation holds already is
        replaced by a fresh one), or None when the conversation is gone."""
        table = schema.conversations
        async with self._write() as conn:
            # Locked: two requests adding to one conversation at once take turns (positions stay unique).
            found = await conn.execute(select(table.c.conversation_id)
                                       .where(table.c.conversation_id == conversation_id).with_for_update())
            if found.first() is None:
                return None
            return await self._append_items(conn, conversation_id, items)

    async def _append_items(self, conn: AsyncConnection, conversation_id: str,
                            items: Sequence[dict[str, Any]]) -> list[dict]:
        table = schema.conversation_items
        if not items:
            return []
        last = (await conn.execute(select(func.max(table.c.position))
                                   .where(table.c.conversation_id == conversation_id))).scalar()
        given = sorted({item["id"] for item in items if keyable(item["id"], table.c.item_id)})
        taken: set[str] = set()
        for start in range(0, len(given), 500):
            rows = await conn.execute(select(table.c.item_id).where(and_(
                table.c.conversation_id == conversation_id, table.c.item_id.in_(given[start:start + 500]))))
            taken.update(row.item_id for row in rows)
        kept, rows = [], []
        for position, item in enumerate(items, start=0 if last is None else last + 1):
            if item["id"] in taken or not keyable(item["id"], table.c.item_id):
                item = {**item, "id": new_item_id(item.get("type", "message"))}
            taken.add(item["id"])
            kept.append(item)
            rows.append({"conversation_id": conversation_id, "position": position, "item_id": item["id"],
                         "item": _dumps(item)})
        await conn.execute(table.insert(), rows)
        return kept

    async def conversation_items(self, conversation_id: str, *, after: str | None = None, limit: int | None = None,
                                 descending: bool = False) -> tuple[list[dict], bool]:
        """A page of a conversation's items in order (or newest first), after
        the item `after`, at most `limit` (None: all); and whether more follow."""
        table = schema.conversation_items
        query = select(table.c.item).where(table.c.conversation_id == conversation_id)
        async with self._read() as conn:
            if after is not None:
                position = None if not keyable(after, table.c.item_id) else (await conn.execute(
                    select(table.c.position).where(and_(table.c.conversation_id == conversation_id,
                                                        table.c.item_id == after)))).scalar()
                if position is None:
                    raise InvalidInput(f"after: no item {after[:80]!r} in this conversation", param="after",
                                       code="invalid_value")
                query = query.where(table.c.position < position if descending else table.c.position > position)
            query = query.order_by(table.c.position.desc() if descending else table.c.position)
            if limit is not None:
                query = query.limit(limit + 1)
            items = [json.loads(row.item) for row in await conn.execute(query)]
        if limit is None:
            return items, False
        return items[:limit], len(items) > limit

    async def find_conversation_item(self, conversation_id: str, item_id: str) -> dict | None:
        table = schema.conversation_items
        if not keyable(item_id, table.c.item_id):
            return None
        async with self._read() as conn:
            raw = (await conn.execute(select(table.c.item).where(and_(
                table.c.conversation_id == conversation_id, table.c.item_id == item_id)))).scalar()
        return json.loads(raw) if raw is not None else None

    @_runs_to_its_end
    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        table = schema.conversation_items
        if not keyable(item_id, table.c.item_id):
            return False
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(and_(
                table.c.conversation_id == conversation_id, table.c.item_id == item_id)))
        return result.rowcount > 0

    # -- feedback

    @_runs_to_its_end
    async def record_feedback(
        self,
        completion_id: Any,
        *,
        choice_index: Any = 0,
        rating: Any = None,
        preferred_over: Any = None,
        preferred_over_choice_index: Any = 0,
        comment: Any = None,
        can_access: AccessCheck | None = None,
    ) -> Feedback:
        """Records a rating and/or a pairwise choice (this completion preferred
        over `preferred_over`, a completion of the same prompt) and/or a
        comment. NotFound for unknown completions, Forbidden when `can_access`
        refuses a completion's user."""
        if rating is None and preferred_over is None and comment is None:
            raise InvalidInput("give at least one of 'rating', 'preferred_over' or 'comment'", param="rating")
        kind, value = _parse_rating(rating) if rating is not None else (None, None)
        if comment is not None:
            if not isinstance(comment, str):
                raise InvalidInput("'comment' must be a string", param="comment")
            if len(comment) > self.config.max_comment_chars:
                raise InvalidInput(
                    f"'comment' has {len(comment)} characters, at most {self.config.max_comment_chars} allowed",
                    param="comment",
                    code="comment_too_long",
                )
            _check_text(comment, "comment")
        if preferred_over is None:
            preferred_over_choice_index = None
        async with self._write() as conn:
            row = await self._completion_row(conn, completion_id, choice_index)
            if can_access is not None and not can_access(row.user_id):
                raise Forbidden("this API key may not give feedback on that completion", param="completion_id")
            if preferred_over is not None:
                other = await self._completion_row(conn, preferred_over, preferred_over_choice_index, "preferred_over")
                if can_access is not None and not can_access(other.user_id):
                    raise Forbidden("this API key may not give feedback on that completion", param="preferred_over")
                if (other.completion_id, other.choice_index) == (row.completion_id, row.choice_index):
                    raise InvalidInput("a completion cannot be preferred over itself", param="preferred_over")
                if other.prompt_key != row.prompt_key:
                    raise InvalidInput(
                        "'preferred_over' must be a completion of the same prompt (the same messages)",
                        param="preferred_over",
                        code="prompt_mismatch",
                    )
            record = Feedback(
                feedback_id=f"fb-{uuid.uuid4().hex}",
                completion_id=row.completion_id,
                choice_index=row.choice_index,
                user_id=row.user_id,
                rating=rating_out(kind, value),
                preferred_over=preferred_over,
                preferred_over_choice_index=preferred_over_choice_index,
                comment=comment,
                created_at=_now(),
            )
            await conn.execute(
                schema.feedback.insert().values(
                    feedback_id=record.feedback_id,
                    completion_id=record.completion_id,
                    choice_index=record.choice_index,
                    user_id=record.user_id,
                    rating_kind=kind,
                    rating=value,
                    other_completion_id=preferred_over,
                    other_choice_index=preferred_over_choice_index,
                    comment=None if comment is None else _dumps(comment),
                    created_at=record.created_at,
                )
            )
        return record

    async def list_feedback(self, completion_id: str | None = None) -> list[Feedback]:
        f = schema.feedback
        query = select(f).order_by(f.c.id)
        if completion_id is not None:
            query = query.where(f.c.completion_id == completion_id)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Feedback(
                r.feedback_id,
                r.completion_id,
                r.choice_index,
                r.user_id,
                rating_out(r.rating_kind, r.rating),
                r.other_completion_id,
                r.other_choice_index,
                None if r.comment is None else json.loads(r.comment),
                r.created_at,
            )
            for r in rows
        ]

    # -- export

    async def export_pairs(self, users: Iterable[str] | None = None) -> ExportResult:
        """Training pairs {"messages", "preference", "chosen", "rejected"}:
        - each pairwise choice gives one pair (the later choice wins when two
          contradict); its preference is the chosen completion's, else the
          rejected one's;
        - ratings: among completions of the same prompt and the same
          preference, each two with different scores give a pair (latest
          rating per completion; thumbs up = 5 stars, down = 1 star), unless
          a pairwise choice already covers those two.
        Pairs without a preference, or with equal or empty answers, are
        skipped and counted in `skipped`."""
        wanted = set(users) if users is not None else None
        f, c = schema.feedback, schema.completions
        async with self._read() as conn:
            feedback_rows = (await conn.execute(select(f).order_by(f.c.id))).all()
            ids = sorted(
                {r.completion_id for r in feedback_rows}
                | {r.other_completion_id for r in feedback_rows if r.other_completion_id is not None}
            )
            completions: dict[tuple[str, int], Completion] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for row in (await conn.execute(select(c).where(c.c.completion_id.in_(chunk)))).all():
                    completions[(row.completion_id, row.choice_index)] = _completion(row)
        result = ExportResult()

        def usable(key: tuple[str, int]) -> bool:
            comp = completions.get(key)
            return comp is not None and (wanted is None or comp.user_id in wanted)

        chosen_pairs: dict[frozenset, tuple[tuple[str, int], tuple[tuple[str, int]], str, int]] = {}
        latest_rating: dict[tuple[str, int], tuple[float, int]] = {}
        for r in feedback_rows:
            key = (r.completion_id, r.choice_index)
            if r.rating_kind is not None:
                latest_rating[key] = (rating_score(r.rating_kind, r.rating), r.id)
            if r.other_completion_id is not None:
                other = (r.other_completion_id, r.other_choice_index or 0)
                if usable(key) and usable(other):
                    chosen_pairs[frozenset((key, other))] = (key, other, "pairwise", r.id)
                else:
                    result.skip("completion_missing_or_filtered")
        groups: dict[tuple[str, str], list[tuple[tuple[str, int], float, int]]] = {}
        for key, (score, order) in latest_rating.items():
            if usable(key):
                comp = completions[key]
                groups.setdefault((comp.prompt_key, comp.preference_key), []).append((key, score, order))
        for members in groups.values():
            for i, (a, score_a, order_a) in enumerate(members):
                for b, score_b, order_b in members[i + 1 :]:
                    if score_a == score_b or frozenset((a, b)) in chosen_pairs:
                        continue
                    chosen, rejected = (a, b) if score_a > score_b else (b, a)
                    chosen_pairs[frozenset((a, b))] = (chosen, rejected, "rating", max(order_a, order_b))
        for chosen_key, rejected_key, source, _order in sorted(chosen_pairs.values(), key=lambda v: (v[3], v[0], v[1])):
            chosen, rejected = completions[chosen_key], completions[rejected_key]
            preference = preference_text(chosen.preferences) or preference_text(rejected.preferences)
            if not preference.strip():
                result.skip("no_preference")
                continue
            if not chosen.answer.strip() or not rejected.answer.strip():
                result.skip("empty_answer")
                continue
            if chosen.answer == rejected.answer:
                result.skip("same_answer")
                continue
            result.pairs.append(
                {
                    "messages": chosen.messages,
                    "preference": preference,
                    "chosen": chosen.answer,
                    "rejected": rejected.answer,
                    "meta": {
                        "source": source,
                        "user": chosen.user_id,
                        "chosen_id": f"{chosen.completion_id}:{chosen.choice_index}",
                        "rejected_id": f"{rejected.completion_id}:{rejected.choice_index}",
                    },
                }
            )
        return result


def _completion(row) -> Completion:
    return Completion(
        completion_id=row.completion_id,
        choice_index=row.choice_index,
        user_id=row.user_id,
        messages=json.loads(row.messages),
        preferences=_prefs_from_json(row.preferences),
        answer=json.loads(row.answer),
        model=row.model,
        created_at=row.created_at,
        prompt_key=row.prompt_key,
        preference_key=row.preference_key,
    )


def _stored_response(row) -> StoredResponse:
    return StoredResponse(response_id=row.response_id, user_id=row.user_id,
                          conversation=json.loads(row.conversation), call_names=json.loads(row.call_names),
                          input_items=json.loads(row.input_items), response=json.loads(row.response),
                          created_at=row.created_at)


def _stored_chat_completion(row) -> StoredChatCompletion:
    return StoredChatCompletion(row.completion_id, row.user_id, row.model, json.loads(row.metadata),
                                json.loads(row.messages), json.loads(row.completion), row.created_at)


RUNNING_BATCH = ("validating", "in_progress", "finalizing", "cancelling")


def _file_row(file: StoredFile, content: bytes) -> dict[str, Any]:
    return {"file_id": file.file_id, "user_id": file.user_id, "purpose": file.purpose, "filename": file.filename,
            "bytes": file.bytes, "created_at": file.created_at, "expires_at": file.expires_at, "content": content}


def _stored_file(row) -> StoredFile:
    return StoredFile(row.file_id, row.user_id, row.purpose, row.filename, row.bytes, row.created_at, row.expires_at)


def _file_alive(now: int):
    """The condition a file not yet expired meets."""
    table = schema.files
    return or_(table.c.expires_at.is_(None), table.c.expires_at > now)


def _stored_batch(row) -> StoredBatch:
    running = row.token is not None and row.expires_at_ms is not None and row.expires_at_ms >= _now_ms()
    batch = json.loads(row.batch)
    if row.cancel_requested and batch["status"] in RUNNING_BATCH:  # asked, its runner not done with it yet
        # (cancel_requested holds the ask's unix time; a batch asked before schema v8 holds 1)
        batch = {**batch, "status": "cancelling", "cancelling_at": row.cancel_requested if row.cancel_requested > 1
                 else batch.get("cancelling_at")}
    return StoredBatch(row.batch_id, row.user_id, batch, running)


def _after(created_column, seq_column, created: int, seq: int, descending: bool):
    """The rows after (created, seq) in a list ordered by both."""
    if descending:
        return or_(created_column < created, and_(created_column == created, seq_column < seq))
    return or_(created_column > created, and_(created_column == created, seq_column > seq))


def _stored_conversation(row) -> StoredConversation:
    return StoredConversation(conversation_id=row.conversation_id, user_id=row.user_id,
                              metadata=json.loads(row.metadata), created_at=row.created_at)


def _sqlite_events(engine: AsyncEngine) -> None:
    """WAL + synchronous=FULL on every connection; transactions begun by us
    (pysqlite's implicit BEGIN is turned off), IMMEDIATE for writers."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")  # first: switching to WAL may wait for a lock
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("pad_write") else "BEGIN")
