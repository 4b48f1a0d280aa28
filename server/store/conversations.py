"""Conversations API conversations: their metadata, their items, and the
turn lease that lets one response at a time answer in one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from server.store import schema
from server.store.base import (
    StoreBase,
    dumps,
    keyable,
    now_ms,
    now_s,
    runs_to_its_end,
    to_ms,
)
from server.store.errors import InvalidInput
from server.store.records import StoredConversation, new_item_id


class ConversationStore(StoreBase):
    """Conversations: create, find, update, delete; their items; their turns."""

    @runs_to_its_end
    async def create_conversation(self, *, user: str | None, metadata: dict[str, str],
                                  items: Sequence[dict[str, Any]] = ()) -> tuple[StoredConversation, list[dict]]:
        """A new conversation holding `items` (each with an id); returns it
        and its items as kept."""
        conversation = StoredConversation(f"conv_{uuid.uuid4().hex}", user or None, dict(metadata), now_s())
        async with self._write() as conn:
            await conn.execute(schema.conversations.insert().values(
                conversation_id=conversation.conversation_id, user_id=conversation.user_id,
                metadata=dumps(conversation.metadata), created_at=conversation.created_at))
            kept = await self._append_items(conn, conversation.conversation_id, items)
        return conversation, kept

    async def find_conversation(self, conversation_id: str) -> StoredConversation | None:
        table = schema.conversations
        if not keyable(conversation_id, table.c.conversation_id):
            return None
        async with self._read() as conn:
            row = (await conn.execute(select(table).where(table.c.conversation_id == conversation_id))).first()
        return _stored_conversation(row) if row is not None else None

    @runs_to_its_end
    async def update_conversation(self, conversation_id: str, metadata: dict[str, str]) -> StoredConversation | None:
        """Replaces its metadata (as OpenAI's update does); None when it is gone."""
        table = schema.conversations
        async with self._write() as conn:
            await conn.execute(update(table).where(table.c.conversation_id == conversation_id)
                               .values(metadata=dumps(metadata)))
            row = (await conn.execute(select(table).where(table.c.conversation_id == conversation_id))).first()
        return _stored_conversation(row) if row is not None else None

    @runs_to_its_end
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

    @runs_to_its_end
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
            now = now_ms()
            held = (await conn.execute(select(turns.c.expires_at_ms)
                                       .where(turns.c.conversation_id == conversation_id))).scalar()
            if held is not None and held > now:
                return False
            await conn.execute(delete(turns).where(turns.c.conversation_id == conversation_id))
            await conn.execute(turns.insert().values(conversation_id=conversation_id, token=token,
                                                     expires_at_ms=now + to_ms(lease_s)))
        return True

    @runs_to_its_end
    async def renew_turn(self, conversation_id: str, token: str, lease_s: float) -> bool:
        """Extends `token`'s turn by `lease_s` seconds from now; False when
        it holds the turn no longer (its lease ran out and another took it,
        or the conversation was deleted)."""
        turns = schema.conversation_turns
        async with self._write() as conn:
            result = await conn.execute(update(turns).where(and_(
                turns.c.conversation_id == conversation_id, turns.c.token == token))
                .values(expires_at_ms=now_ms() + to_ms(lease_s)))
        return result.rowcount > 0

    @runs_to_its_end
    async def end_turn(self, conversation_id: str, token: str) -> None:
        """Gives `token`'s turn back (nothing when it holds it no longer)."""
        turns = schema.conversation_turns
        async with self._write() as conn:
            await conn.execute(delete(turns).where(and_(
                turns.c.conversation_id == conversation_id, turns.c.token == token)))

    @runs_to_its_end
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
                         "item": dumps(item)})
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

    @runs_to_its_end
    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        table = schema.conversation_items
        if not keyable(item_id, table.c.item_id):
            return False
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(and_(
                table.c.conversation_id == conversation_id, table.c.item_id == item_id)))
        return result.rowcount > 0


def _stored_conversation(row) -> StoredConversation:
    return StoredConversation(conversation_id=row.conversation_id, user_id=row.user_id,
                              metadata=json.loads(row.metadata), created_at=row.created_at)
