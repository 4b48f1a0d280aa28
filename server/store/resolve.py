"""Which preferences a chat request runs with.

Order: the request's own `preference` > the profile stored for its `user` >
none. A request that sends `"preference": null` (or "", a blank string, or []) turns
personalization off for itself, even when a profile is stored. The chat route
tells "absent" from "null" by passing UNSET when the field was not sent
(e.g. `body.preference if "preference" in body.model_fields_set else UNSET`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pad_core.types import Preference


class _Unset:
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()
Source = Literal["request", "profile", "none"]


@dataclass(frozen=True)
class Resolution:
    preferences: list[Preference]
    source: Source  # where they came from ("none": plain decoding)


def as_preferences(value: Any) -> list[Preference]:
    """A request's `preference` (a string, a list of strings / {"text",
    "weight"} objects / Preference, or None) as engine Preferences. Shape
    checks only; the engine and the route check bounds."""
    if value is None:
        return []
    if isinstance(value, str):
        return [Preference(text=value)] if value.strip() else []  # "" or "  ": nothing asked
    if isinstance(value, Preference):
        return [value]
    if isinstance(value, Sequence):
        out = []
        for item in value:
            if isinstance(item, Preference):
                out.append(item)
            elif isinstance(item, str):
                out.append(Preference(text=item))
            elif isinstance(item, dict):
                out.append(Preference(text=item["text"], weight=float(item.get("weight", 1.0))))
            elif hasattr(item, "text"):  # a pydantic model of the route
                weight = getattr(item, "weight", None)
                out.append(Preference(text=item.text, weight=1.0 if weight is None else float(weight)))
            else:
                raise TypeError(f"not a preference: {item!r}")
        return out
    raise TypeError(f"not a preference: {value!r}")


def resolve_preferences(request_preference: Any = UNSET, stored: Sequence[Preference] | None = None) -> Resolution:
    """Pure: request `preference` (UNSET when absent) and the user's stored
    preferences (None when no user or no profile) -> what the request uses."""
    if request_preference is not UNSET:
        prefs = as_preferences(request_preference)
        return Resolution(prefs, "request" if prefs else "none")
    if stored:
        return Resolution(list(stored), "profile")
    return Resolution([], "none")


def needs_profile(request_preference: Any, user: str | None) -> bool:
    """Whether the stored profile matters (skip the database otherwise)."""
    return request_preference is UNSET and bool(user)


async def resolve_for_request(store: Any, user: str | None, request_preference: Any = UNSET) -> Resolution:
    """resolve_preferences with the profile read from `store` only when needed
    (store may be None: no memory)."""
    stored = None
    if store is not None and needs_profile(request_preference, user):
        stored = await store.find_preferences(user)
    return resolve_preferences(request_preference, stored)
