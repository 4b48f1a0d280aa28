"""Chat completions kept with `store: true` (`client.chat.completions.list`,
retrieve, update, delete) and their metadata pairs."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update

from server.store import schema
from server.store.base import StoreBase, dumps, keyable, now_s, runs_to_its_end
from server.store.errors import InvalidInput
from server.store.records import StoredChatCompletion


class ChatCompletionStore(StoreBase):
    """Stored chat completions: record, find, list (filtered, paged), update, delete."""

    @property
    def keeps_chat_completions(self) -> bool:
        return self.config.chat_completions_retention_days > 0

    def _alive_chat_completions(self) -> Any:
        """The condition a kept chat completion within its retention meets
        (one past it is gone at once, pruned or not yet)."""
        cutoff = int(time.time() - self.config.chat_completions_retention_days * 86400.0)
        return schema.chat_completions.c.created_at >= cutoff

    @runs_to_its_end
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
            "metadata": dumps(metadata),
            "messages": dumps(list(messages)),
            "completion": dumps(completion),
            "created_at": int(completion.get("created") or now_s()),
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

    @runs_to_its_end
    async def update_chat_completion(self, completion_id: str, metadata: dict[str, str]
                                     ) -> StoredChatCompletion | None:
        """Replaces its metadata (as OpenAI's update does); None when it is gone."""
        table, pairs = schema.chat_completions, schema.chat_completion_metadata
        async with self._write() as conn:
            result = await conn.execute(update(table).where(table.c.completion_id == completion_id)
                                        .values(metadata=dumps(metadata)))
            if not result.rowcount:
                return None
            await conn.execute(delete(pairs).where(pairs.c.completion_id == completion_id))
            if metadata:
                await conn.execute(pairs.insert(), [{"completion_id": completion_id, "key": key, "value": value}
                                                    for key, value in metadata.items()])
            row = (await conn.execute(select(table).where(table.c.completion_id == completion_id))).first()
        return _stored_chat_completion(row)

    @runs_to_its_end
    async def delete_chat_completion(self, completion_id: str) -> bool:
        table, pairs = schema.chat_completions, schema.chat_completion_metadata
        async with self._write() as conn:  # the completion first, then its pairs (see _prune_chat_completions)
            result = await conn.execute(delete(table).where(table.c.completion_id == completion_id))
            await conn.execute(delete(pairs).where(pairs.c.completion_id == completion_id))
        return result.rowcount > 0


def _stored_chat_completion(row) -> StoredChatCompletion:
    return StoredChatCompletion(row.completion_id, row.user_id, row.model, json.loads(row.metadata),
                                json.loads(row.messages), json.loads(row.completion), row.created_at)
