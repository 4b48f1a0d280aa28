"""Completions kept for feedback, the feedback on them (ratings, pairwise
choices, comments), and the training pairs exported from it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import and_, select

from pad_core.errors import InvalidRequestError
from pad_core.types import Preference
from pad_core.validation import INT32_MAX, check_int
from server.store import schema
from server.store.base import (
    StoreBase,
    check_id,
    check_store_text,
    content_key,
    dumps,
    normalize_messages,
    now_s,
    runs_to_its_end,
)
from server.store.errors import Forbidden, InvalidInput, NotFound
from server.store.records import (
    Completion,
    ExportResult,
    Feedback,
    prefs_from_json,
    prefs_json,
)

THUMBS = {"up": 1, "thumbs_up": 1, "down": 0, "thumbs_down": 0}
AccessCheck = Callable[[str | None], bool]


def _check_index(value: Any, param: str) -> int:
    """A choice index: a non-negative integer that fits the INTEGER column."""
    try:
        return check_int(value, param, 0, INT32_MAX)
    except InvalidRequestError:
        raise InvalidInput("choice index must be a non-negative integer", param=param) from None



# /v1/completions' ids (server/routes/completions.py): raw-text answers, never recorded.
TEXT_COMPLETION_PREFIX = "cmpl-"


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





def preference_text(preferences: Sequence[Preference]) -> str:
    """The single preference string of a training pair: the texts of the
    positively weighted preferences, one per line."""
    return "\n".join(p.text for p in preferences if p.weight > 0)


class FeedbackStore(StoreBase):
    """Completions kept for feedback, feedback, and its export as training pairs."""

    # -- completions

    @property
    def keeps_completions(self) -> bool:
        return self.config.feedback_retention_days > 0

    @runs_to_its_end
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
        prefs = prefs_json(preferences or [])
        created = int(created if created is not None else now_s())
        rows = [
            {
                "completion_id": completion_id,
                "choice_index": index,
                "user_id": user or None,
                "messages": dumps(chat),
                "prompt_key": content_key(chat),
                "preferences": dumps(prefs),
                "preference_key": content_key(prefs),
                "answer": dumps(answer),
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
        check_id(completion_id, param)
        choice_index = _check_index(choice_index, param)
        table = schema.completions
        row = (
            await conn.execute(
                select(table).where(and_(table.c.completion_id == completion_id, table.c.choice_index == choice_index))
            )
        ).first()
        if row is None and completion_id.startswith(TEXT_COMPLETION_PREFIX):
            raise NotFound(
                f"{completion_id!r} is a text completion (/v1/completions): those are not kept for feedback, "
                "as a raw prompt has no chat messages to pair answers on; rate a chat completion, a response "
                "or a message",
                param=param,
                code="completion_not_kept",
            )
        if row is None:
            what = f"choice {choice_index} of " if choice_index else ""
            raise NotFound(
                f"no stored completion {what}{completion_id!r} (unknown, or older than the "
                f"{self.config.feedback_retention_days:g}-day retention)",
                param=param,
                code="completion_not_found",
            )
        return row

    # -- feedback

    @runs_to_its_end
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
            check_store_text(comment, "comment")
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
                created_at=now_s(),
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
                    comment=None if comment is None else dumps(comment),
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
        preferences=prefs_from_json(row.preferences),
        answer=json.loads(row.answer),
        model=row.model,
        created_at=row.created_at,
        prompt_key=row.prompt_key,
        preference_key=row.preference_key,
    )
