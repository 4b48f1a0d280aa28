"""Batch API batches (and Anthropic's Message Batches): their objects, their
runners' leases, their results so far."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from server.store import schema
from server.store.base import (
    StoreBase,
    after_cursor,
    dumps,
    keyable,
    now_ms,
    now_s,
    runs_to_its_end,
    to_ms,
)
from server.store.errors import InvalidInput
from server.store.files import file_row
from server.store.records import ClaimedBatch, StoredBatch, StoredFile


class BatchStore(StoreBase):
    """Batches: create, find, list, update, end, and the leases a gateway
    runs them under (renew, release, claim an orphaned one, cancel)."""

    @runs_to_its_end
    async def create_batch(self, batch: dict[str, Any], *, user: str | None, token: str, lease_s: float,
                           key_id: str | None, users: frozenset[str] | None,
                           output_expires_s: int | None = None) -> None:
        """Stores a new batch, its runner's lease, and the key scope its
        requests run with (see schema.batch_runs)."""
        async with self._write() as conn:
            await conn.execute(schema.batches.insert().values(
                batch_id=batch["id"], user_id=user, batch=dumps(batch), created_at=batch["created_at"],
                token=token, expires_at_ms=now_ms() + to_ms(lease_s), cancel_requested=0))
            await conn.execute(schema.batch_runs.insert().values(
                batch_id=batch["id"], key_id=key_id, users=None if users is None else dumps(sorted(users)),
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
                conditions.append(after_cursor(table.c.created_at, table.c.seq, *cursor, descending=True))
            if before is not None:  # newer than it
                cursor = await self._batch_cursor(conn, before, conditions, "before")
                conditions.append(after_cursor(table.c.created_at, table.c.seq, *cursor, descending=False))
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

    @runs_to_its_end
    async def update_batch(self, batch: dict[str, Any], token: str,
                           results: Sequence[tuple[int, bool, str]] = ()) -> bool:
        """Stores the batch's new state and its new results ((line, ok,
        JSON line) each), in one transaction, if `token` still holds its
        run; False (nothing stored) when it does not."""
        table = schema.batches
        async with self._write() as conn:
            result = await conn.execute(update(table).where(and_(table.c.batch_id == batch["id"],
                                                                 table.c.token == token))
                                        .values(batch=dumps(batch)))
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

    @runs_to_its_end
    async def end_batch(self, batch: dict[str, Any], token: str, files: Sequence[tuple[StoredFile, bytes]]) -> bool:
        """The batch's end, in one transaction: its result files recorded,
        its last state stored, its lease and stored results dropped; False
        (nothing stored) when `token` no longer holds its run."""
        table = schema.batches
        async with self._write() as conn:
            result = await conn.execute(update(table).where(and_(table.c.batch_id == batch["id"],
                                                                 table.c.token == token))
                                        .values(batch=dumps(batch), token=None, expires_at_ms=None))
            if not result.rowcount:
                return False
            for file, content in files:
                await conn.execute(schema.files.insert().values(**file_row(file, content)))
            await conn.execute(delete(schema.batch_results).where(schema.batch_results.c.batch_id == batch["id"]))
            await conn.execute(delete(schema.batch_runs).where(schema.batch_runs.c.batch_id == batch["id"]))
        return True

    @runs_to_its_end
    async def renew_batch(self, batch_id: str, token: str, lease_s: float) -> bool | None:
        """Extends the runner's lease; whether a cancel was asked (None: the
        run is no longer this runner's)."""
        table = schema.batches
        return await self._renew_lease(table, table.c.batch_id == batch_id, token, lease_s)

    @runs_to_its_end
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
                table.c.expires_at_ms.is_not(None), table.c.expires_at_ms < now_ms()))
                .order_by(table.c.expires_at_ms).limit(limit))).all()
        return [row.batch_id for row in rows]

    @runs_to_its_end
    async def claim_batch(self, batch_id: str, token: str, lease_s: float) -> ClaimedBatch | None:
        """Takes an orphaned batch's lease for `token`, if no runner holds it
        (one gateway wins a race); the batch, whether a cancel was asked,
        and the key scope it runs with. None: not orphaned (any more)."""
        table, runs = schema.batches, schema.batch_runs
        orphaned = and_(table.c.batch_id == batch_id, table.c.expires_at_ms.is_not(None),
                        table.c.expires_at_ms < now_ms())
        async with self._write() as conn:
            result = await conn.execute(update(table).where(orphaned)
                                        .values(token=token, expires_at_ms=now_ms() + to_ms(lease_s)))
            if not result.rowcount:
                return None
            row = (await conn.execute(select(table).where(table.c.batch_id == batch_id))).first()
            scope = (await conn.execute(select(runs).where(runs.c.batch_id == batch_id))).first()
        users = None if scope is None or scope.users is None else frozenset(json.loads(scope.users))
        return ClaimedBatch(_stored_batch(row), bool(row.cancel_requested), scope is not None,
                            None if scope is None else scope.key_id, users,
                            None if scope is None else scope.output_expires_s)

    @runs_to_its_end
    async def request_batch_cancel(self, batch_id: str) -> bool:
        """Asks the batch's runner, on whatever gateway (or the one that
        resumes it), to cancel it; False when it is not running. Until the
        runner has ended it, the batch reads `cancelling`."""
        table = schema.batches
        async with self._write() as conn:  # the time of the first ask: the batch reads `cancelling` since then
            result = await conn.execute(update(table).where(and_(table.c.batch_id == batch_id,
                                                                 table.c.expires_at_ms.is_not(None)))
                                        .values(cancel_requested=func.coalesce(
                                            func.nullif(table.c.cancel_requested, 0), now_s())))
        return result.rowcount > 0


RUNNING_BATCH = ("validating", "in_progress", "finalizing", "cancelling")


def _stored_batch(row) -> StoredBatch:
    running = row.token is not None and row.expires_at_ms is not None and row.expires_at_ms >= now_ms()
    batch = json.loads(row.batch)
    if row.cancel_requested and batch["status"] in RUNNING_BATCH:  # asked, its runner not done with it yet
        # (cancel_requested holds the ask's unix time; a batch asked before schema v8 holds 1)
        batch = {**batch, "status": "cancelling", "cancelling_at": row.cancel_requested if row.cancel_requested > 1
                 else batch.get("cancelling_at")}
    return StoredBatch(row.batch_id, row.user_id, batch, running)
