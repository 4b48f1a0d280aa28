"""Pruning: what is past its retention or expiry is deleted now and then
(each write that adds rows looks whether it is time)."""

from __future__ import annotations

import json
import logging
import time

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from server.store import schema
from server.store.base import StoreBase, runs_to_its_end

logger = logging.getLogger(__name__)


class RetentionStore(StoreBase):
    """Deletes completions, feedback, responses, stored chat completions and
    files past their retention or expiry."""

    @runs_to_its_end
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
