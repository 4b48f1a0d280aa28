"""The store's foundation: the database connection, its write and read
transactions, and the helpers every kind of record shares.

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
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Self

from sqlalchemy import and_, event, or_, select, update
from sqlalchemy.engine.url import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pad_core.errors import InvalidRequestError
from pad_core.validation import check_text
from server.store import schema
from server.store.config import StoreConfig, redact_url
from server.store.errors import InvalidInput

logger = logging.getLogger(__name__)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def content_key(value: Any) -> str:
    return hashlib.sha256(dumps(value).encode("ascii")).hexdigest()


def now_s() -> int:
    return int(time.time())


def now_ms() -> int:
    return int(time.time() * 1000)


def to_ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def store_error(exc: InvalidRequestError) -> InvalidInput:
    return InvalidInput(exc.message, param=exc.param, code=exc.code)


def check_store_text(value: Any, param: str) -> None:
    try:
        check_text(value, param)
    except InvalidRequestError as exc:
        raise store_error(exc) from None


def check_id(value: Any, param: str) -> None:
    """An id that is a database key: valid Unicode without NUL (PostgreSQL
    text cannot hold one, and would fail the query)."""
    check_store_text(value, param)
    if "\x00" in value:
        raise InvalidInput(f"{param} must not contain NUL characters", param=param, code="invalid_text")


def keyable(value: Any, column) -> bool:
    """Whether `value` can name a row by that String column: a non-empty
    string no longer than the column holds, without NUL (PostgreSQL text
    cannot hold one: the query would fail). Any other value names no row."""
    return isinstance(value, str) and 0 < len(value) <= column.type.length and "\x00" not in value




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


def after_cursor(created_column, seq_column, created: int, seq: int, descending: bool):
    """The rows after (created, seq) in a list ordered by both."""
    if descending:
        return or_(created_column < created, and_(created_column == created, seq_column < seq))
    return or_(created_column > created, and_(created_column == created, seq_column > seq))


CLOSE_WRITES_WAIT_S = 10.0  # how long closing waits for the writes whose callers went away


def runs_to_its_end(write):
    """A store write, once begun, runs to its end even when its caller is
    cancelled (a client that hangs up cancels its stream's task). A
    transaction cut in the middle leaves its connection to the garbage
    collector, invalidated but not closed: on SQLite with the database's
    write lock held, so every writer of every process waits out the busy
    timeout; on PostgreSQL with its row locks held. The caller still sees
    its CancelledError at once; the write's own result is dropped (an error
    logged), and `close()` waits for such writes."""

    @functools.wraps(write)
    async def shielded(self: StoreBase, *args, **kwargs):
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


class StoreBase:
    """The store's connection and transactions; each kind of record adds its
    methods (server/store/repository.py puts them together as `Store`)."""

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
    async def open(cls, config: StoreConfig | None = None, *, settings: object | None = None) -> Self:
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

    async def __aenter__(self) -> Self:
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
            raise InvalidInput("user id must be a non-empty string", param="user_id", code="invalid_value")
        if len(user_id) > self.config.max_user_id_chars:
            raise InvalidInput(
                f"user id has {len(user_id)} characters, at most {self.config.max_user_id_chars} allowed",
                param="user_id", code="invalid_value",
            )
        check_id(user_id, "user_id")

    async def _maybe_prune(self) -> None:
        if time.monotonic() >= self._next_prune:
            await self.prune()

    async def prune(self, now: float | None = None) -> int:
        raise NotImplementedError  # server/store/retention.py's

    async def _renew_lease(self, table, this_run, token: str, lease_s: float) -> bool | None:
        """A run's lease (background_responses', batches') extended if `token`
        holds it; whether a cancel was asked (None: the token holds it no more)."""
        mine = and_(this_run, table.c.token == token)
        async with self._write() as conn:
            result = await conn.execute(update(table).where(mine).values(expires_at_ms=now_ms() + to_ms(lease_s)))
            if not result.rowcount:
                return None
            return bool((await conn.execute(select(table.c.cancel_requested).where(mine))).scalar())


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
