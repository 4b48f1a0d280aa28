"""Responses API responses kept with `store`, a streamed background
response's events, and the leases of background responses' runners."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, select, update

from server.store import schema
from server.store.base import (
    StoreBase,
    dumps,
    keyable,
    normalize_messages,
    now_ms,
    now_s,
    runs_to_its_end,
    to_ms,
)
from server.store.records import ResponseEvent, StoredResponse


class ResponseStore(StoreBase):
    """Kept responses, their events, and background runs' leases."""

    # -- responses (the Responses API's `store`)

    @property
    def keeps_responses(self) -> bool:
        return self.config.responses_retention_days > 0

    @runs_to_its_end
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
            "conversation": dumps(normalize_messages(conversation)),
            "call_names": dumps(call_names),
            "input_items": dumps(list(input_items)),
            "response": dumps(response),
            "created_at": int(response.get("created_at") or now_s()),
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

    @runs_to_its_end
    async def delete_response(self, response_id: str) -> bool:
        table, events = schema.responses, schema.response_events
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(table.c.response_id == response_id))
            await conn.execute(delete(events).where(events.c.response_id == response_id))
        return result.rowcount > 0

    # -- a streamed background response's events (server/background_events.py)

    @runs_to_its_end
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

    # -- background responses (`background: true`): their runners' leases

    @runs_to_its_end
    async def begin_background(self, response_id: str, token: str, lease_s: float) -> None:
        async with self._write() as conn:
            await conn.execute(schema.background_responses.insert().values(
                response_id=response_id, token=token, expires_at_ms=now_ms() + to_ms(lease_s), cancel_requested=0))

    @runs_to_its_end
    async def renew_background(self, response_id: str, token: str, lease_s: float) -> bool | None:
        """Extends the runner's lease; whether a cancel was asked meanwhile
        (None: the run is no longer this runner's)."""
        table = schema.background_responses
        return await self._renew_lease(table, table.c.response_id == response_id, token, lease_s)

    async def _ask_cancel(self, table, this_run) -> bool:
        """Flags a background response's run for its runner, on whatever
        gateway, to cancel; False when no live lease holds it."""
        async with self._write() as conn:
            result = await conn.execute(update(table).where(and_(this_run, table.c.expires_at_ms >= now_ms()))
                                        .values(cancel_requested=1))
        return result.rowcount > 0

    @runs_to_its_end
    async def end_background(self, response_id: str, token: str) -> None:
        table = schema.background_responses
        async with self._write() as conn:
            await conn.execute(delete(table).where(and_(table.c.response_id == response_id, table.c.token == token)))

    async def background_running(self, response_id: str) -> bool:
        """Whether a runner, on whatever gateway, holds the response's lease."""
        table = schema.background_responses
        async with self._read() as conn:
            return (await conn.execute(select(table.c.response_id).where(and_(
                table.c.response_id == response_id, table.c.expires_at_ms >= now_ms())))).first() is not None

    @runs_to_its_end
    async def request_background_cancel(self, response_id: str) -> bool:
        """Asks the runner of a background response, on whatever gateway, to
        cancel it; False when none runs it."""
        table = schema.background_responses
        return await self._ask_cancel(table, table.c.response_id == response_id)

    @runs_to_its_end
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
                runs.c.response_id == response_id, runs.c.expires_at_ms >= now_ms())))).first()
            if alive is not None:
                return kept
            response = settled(kept.response)
            await conn.execute(update(table).where(table.c.response_id == response_id)
                               .values(response=dumps(response)))
            await conn.execute(delete(runs).where(runs.c.response_id == response_id))
        return dataclasses.replace(kept, response=response)


def _stored_response(row) -> StoredResponse:
    return StoredResponse(response_id=row.response_id, user_id=row.user_id,
                          conversation=json.loads(row.conversation), call_names=json.loads(row.call_names),
                          input_items=json.loads(row.input_items), response=json.loads(row.response),
                          created_at=row.created_at)
