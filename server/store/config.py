"""Storage settings: PAD_DB_URL, PAD_DATA_DIR, retentions and bounds.

`StoreSettings` is a pydantic-settings class with the same env prefix as
the server's settings; the gateway's `ServerSettings` may inherit it (or
declare the same fields). `StoreConfig.from_settings` reads these fields from
any settings object, falling back to the defaults below."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME")
    return (Path(base) if base else Path.home() / ".local" / "share") / "pad-server"


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAD_", extra="ignore", populate_by_name=True)

    db_url: str | None = Field(
        None,
        description="database URL: postgresql://user:pass@host/db (asyncpg) or sqlite:///path; "
        "default: SQLite at <data_dir>/pad.db",
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="server data (the SQLite database)")
    feedback_retention_days: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="days a completion (prompt, preference, answer) is kept for feedback; 0 keeps none"
    )
    responses_retention_days: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="days a Responses API response with store true is kept (GET /v1/responses/{id}, "
        "previous_response_id); 0 keeps none"
    )
    chat_completions_retention_days: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="days a chat completion with store true is kept (GET /v1/chat/"
        "completions and /v1/chat/completions/{id}); 0 keeps none"
    )
    max_preferences: int = Field(8, ge=1, description="preferences per request and per stored profile")
    max_preference_chars: int = Field(2000, ge=1, description="characters per preference text")


@dataclass(frozen=True)
class StoreConfig:
    url: str
    feedback_retention_days: float = 30.0
    responses_retention_days: float = 30.0
    chat_completions_retention_days: float = 30.0
    max_preferences: int = 8
    max_preference_chars: int = 2000
    max_comment_chars: int = 4000
    max_user_id_chars: int = 256

    @classmethod
    def from_settings(cls, settings: object | None = None) -> StoreConfig:
        defaults = StoreSettings()
        get = lambda name: getattr(settings, name, None) if settings is not None else None  # noqa: E731
        pick = lambda name: get(name) if get(name) is not None else getattr(defaults, name)  # noqa: E731
        url = pick("db_url") or sqlite_url(Path(pick("data_dir")) / "pad.db")
        return cls(
            url=normalize_url(url),
            feedback_retention_days=float(pick("feedback_retention_days")),
            responses_retention_days=float(pick("responses_retention_days")),
            chat_completions_retention_days=float(pick("chat_completions_retention_days")),
            max_preferences=int(pick("max_preferences")),
            max_preference_chars=int(pick("max_preference_chars")),
        )


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path).expanduser().absolute()}"


def normalize_url(url: str) -> str:
    """Plain URLs get the async drivers: postgresql:// -> postgresql+asyncpg://,
    sqlite:// -> sqlite+aiosqlite://. Other drivers are refused."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r} (expected postgresql://... or sqlite:///path)")
    base = scheme.split("+", 1)[0].lower()
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    raise ValueError(f"unsupported database {scheme!r}: use postgresql:// or sqlite://")


def redact_url(url: str) -> str:
    """The URL with its password hidden, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.split("@", 1)[0]:
        creds, host = rest.split("@", 1)
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
    return url
