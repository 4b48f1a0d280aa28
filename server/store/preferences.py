"""Preference profiles: a user's stored preferences (/v1/users/{user}/preferences),
which a request by that user is steered by when it brings none."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update

from pad_core.errors import InvalidRequestError
from pad_core.types import Preference, RequestLimits, distinct_preferences, preference_key, verify_preferences
from server.store import schema
from server.store.base import StoreBase, dumps, now_s, runs_to_its_end, store_error
from server.store.config import StoreConfig
from server.store.errors import InvalidInput, NotFound
from server.store.records import Profile, prefs_from_json, prefs_json


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
        raise store_error(exc) from None
    return [Preference(text=p.text, weight=float(p.weight)) for p in prefs]


class PreferenceStore(StoreBase):
    """Profiles: get, put (replace), patch (add / remove), delete."""

    async def get_preferences(self, user_id: str) -> Profile:
        """The stored profile; NotFound when the user has none."""
        self._check_user_id(user_id)
        async with self._read() as conn:
            row = (await conn.execute(select(schema.user_profiles).where(schema.user_profiles.c.user_id == user_id))).first()
        if row is None:
            raise NotFound(f"no stored preferences for user {user_id!r}", param="user_id", code="user_not_found")
        return Profile(row.user_id, prefs_from_json(row.preferences), row.created_at, row.updated_at)

    async def find_preferences(self, user_id: str | None) -> list[Preference] | None:
        """The stored preferences a chat of the user runs with (distinct:
        a profile may predate texts matching case aside), or None when
        there is no profile."""
        if not user_id or len(user_id) > self.config.max_user_id_chars:
            return None
        try:
            return distinct_preferences((await self.get_preferences(user_id)).preferences)
        except (NotFound, InvalidInput):
            return None

    @runs_to_its_end
    async def put_preferences(self, user_id: str, preferences: Any) -> Profile:
        """Replaces the whole list (creates the profile if needed)."""
        self._check_user_id(user_id)
        prefs = validate_preferences(preferences, self.config)
        now = now_s()
        table = schema.user_profiles
        stmt = self._insert(table).values(user_id=user_id, preferences=dumps(prefs_json(prefs)), created_at=now, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.user_id],
            set_={"preferences": stmt.excluded.preferences, "updated_at": stmt.excluded.updated_at},
        ).returning(table.c.created_at)
        async with self._write() as conn:
            created = (await conn.execute(stmt)).scalar_one()
        return Profile(user_id, list(prefs), created, now)

    @runs_to_its_end
    async def patch_preferences(self, user_id: str, add: Any = None, remove: Any = None) -> Profile:
        """Adds preferences (an existing text gets the new weight and spelling,
        in place) and removes texts (absent ones are ignored: the PATCH is
        idempotent); texts match case and spacing aside (preference_key). A
        text both added and removed is refused: which one is meant is unclear.
        NotFound for a user without a profile."""
        self._check_user_id(user_id)
        add_prefs = validate_preferences(add if add is not None else [], self.config, param="add")
        if remove is None:
            remove = []
        if not isinstance(remove, list) or not all(isinstance(t, str) for t in remove):
            raise InvalidInput("'remove' must be a list of preference texts", param="remove")
        drop = {preference_key(text) for text in remove}
        both = next((p.text for p in add_prefs if preference_key(p.text) in drop), None)
        if both is not None:
            raise InvalidInput(f"{both!r} is both added and removed; send one or the other",
                               param="remove", code="conflicting_preference")
        table = schema.user_profiles
        async with self._write() as conn:
            row = (
                await conn.execute(select(table).where(table.c.user_id == user_id).with_for_update())
            ).first()
            if row is None:
                raise NotFound(f"no stored preferences for user {user_id!r}", param="user_id", code="user_not_found")
            current = distinct_preferences(prefs_from_json(row.preferences))  # may predate the case rule
            merged = [p for p in current if preference_key(p.text) not in drop]
            position = {preference_key(p.text): i for i, p in enumerate(merged)}
            for pref in add_prefs:
                key = preference_key(pref.text)
                if key in position:
                    merged[position[key]] = pref
                else:
                    position[key] = len(merged)
                    merged.append(pref)
            if len(merged) > self.config.max_preferences:
                raise InvalidInput(
                    f"too many preferences: the result would have {len(merged)}, "
                    f"at most {self.config.max_preferences} allowed",
                    param="add",
                    code="too_many_preferences",
                )
            now = now_s()
            await conn.execute(
                update(table).where(table.c.user_id == user_id).values(preferences=dumps(prefs_json(merged)), updated_at=now)
            )
        return Profile(user_id, merged, row.created_at, now)

    @runs_to_its_end
    async def delete_preferences(self, user_id: str) -> None:
        self._check_user_id(user_id)
        table = schema.user_profiles
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(table.c.user_id == user_id))
        if result.rowcount == 0:
            raise NotFound(f"no stored preferences for user {user_id!r}", param="user_id", code="user_not_found")
