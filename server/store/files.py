"""Files API files: kept until deleted or until they expire."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import and_, delete, or_, select, true

from server.store import schema
from server.store.base import StoreBase, after_cursor, keyable, now_s, runs_to_its_end
from server.store.errors import InvalidInput
from server.store.records import StoredFile


class FileStore(StoreBase):
    """Files: record, find, read, list (paged), delete."""

    @runs_to_its_end
    async def record_file(self, file: StoredFile, content: bytes) -> None:
        async with self._write() as conn:
            await conn.execute(schema.files.insert().values(**file_row(file, content)))
        await self._maybe_prune()

    async def find_file(self, file_id: str) -> StoredFile | None:
        """The file (None when unknown, or expired: gone at once, pruned or not yet)."""
        table = schema.files
        if not keyable(file_id, table.c.file_id):
            return None
        columns = [c for c in table.c if c.name not in ("content", "seq")]
        async with self._read() as conn:
            row = (await conn.execute(select(*columns).where(and_(table.c.file_id == file_id,
                                                                  _file_alive(now_s()))))).first()
        return None if row is None else _stored_file(row)

    async def file_content(self, file_id: str, *, expired_too: bool = False) -> bytes | None:
        """The file's bytes; an expired file's only with `expired_too` (a
        running batch's input, which pruning keeps)."""
        table = schema.files
        if not keyable(file_id, table.c.file_id):
            return None
        alive = true() if expired_too else _file_alive(now_s())
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
                conditions.append(after_cursor(table.c.created_at, table.c.seq, *cursor, descending))
            if purpose is not None:
                conditions.append(table.c.purpose == purpose)
            conditions.append(_file_alive(now_s()))
            order = ((table.c.created_at.desc(), table.c.seq.desc()) if descending
                     else (table.c.created_at, table.c.seq))
            columns = [c for c in table.c if c.name != "content"]
            rows = (await conn.execute(select(*columns).where(and_(true(), *conditions)).order_by(*order)
                                       .limit(limit + 1))).all()
        files = [_stored_file(row) for row in rows]
        return files[:limit], len(files) > limit

    @runs_to_its_end
    async def delete_file(self, file_id: str) -> bool:
        table = schema.files
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(table.c.file_id == file_id))
        return result.rowcount > 0


def file_row(file: StoredFile, content: bytes) -> dict[str, Any]:
    return {"file_id": file.file_id, "user_id": file.user_id, "purpose": file.purpose, "filename": file.filename,
            "bytes": file.bytes, "created_at": file.created_at, "expires_at": file.expires_at, "content": content}


def _stored_file(row) -> StoredFile:
    return StoredFile(row.file_id, row.user_id, row.purpose, row.filename, row.bytes, row.created_at, row.expires_at)


def _file_alive(now: int):
    """The condition a file not yet expired meets."""
    table = schema.files
    return or_(table.c.expires_at.is_(None), table.c.expires_at > now)
