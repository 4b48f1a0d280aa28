"""API keys bound to user ids: who may touch whose profile and feedback.

Key specs (`--api-key`, repeatable; a keys file; PAD_API_KEY):
- `KEY`               unbound: every user, and admin (e.g. loading adapters)
- `KEY:alice,bob`     bound: only users alice and bob; not admin
- `KEY:*`             the same as `KEY`
A keys file (`--api-keys-file`) holds one spec a line (`#` comments), or JSON:
`[{"key": "...", "users": ["alice"]}, {"key": "..."}]` (users absent or null:
unbound), for user ids holding `,` or `:`. In one comma-separated string (an
environment variable), a piece with `:` starts a bound key and the pieces
after it are more of its users: `k1,k2:alice,bob` is k1 unbound, k2 bound to
alice and bob; `;` also separates keys.

No keys configured: no auth, everyone may touch every user.

The gateway's auth calls `KeyTable.authenticate(token)` once per request and
stores the result as `request.state.key_scope`; the routes call
`check_user(scope, user_id)` (profiles, feedback) and `chat_user(scope, user)`
(a chat request's `user`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.store.config import StoreConfig
from server.store.errors import Forbidden, InvalidInput

MAX_USER_CHARS = StoreConfig.max_user_id_chars  # the store's user_id columns


@dataclass(frozen=True)
class KeyScope:
    key_id: str  # a non-secret id of the key (hash prefix), for logs
    users: frozenset[str] | None  # None: every user

    @property
    def admin(self) -> bool:
        return self.users is None

    def can_access(self, user_id: str | None) -> bool:
        if self.users is None:
            return True
        return user_id is not None and user_id in self.users


class KeySpecError(ValueError):
    pass


def _key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def parse_key_spec(spec: str) -> tuple[str, frozenset[str] | None]:
    """`KEY`, `KEY:*` or `KEY:user1,user2` -> (key, users or None)."""
    spec = spec.strip()
    key, sep, users_part = spec.partition(":")
    key = key.strip()
    if not key:
        raise KeySpecError(f"API key spec {spec!r} has an empty key")
    if not sep or users_part.strip() == "*":
        return key, None
    users = frozenset(u.strip() for u in users_part.split(",") if u.strip())
    if not users:
        raise KeySpecError(f"API key spec {key[:4]}...: names no user after ':' (use KEY or KEY:*)")
    return key, users


def split_key_list(value: str) -> list[str]:
    """One string of several specs (see the module doc) -> specs."""
    specs: list[str] = []
    for group in value.split(";"):
        current: str | None = None
        for piece in (p.strip() for p in group.split(",")):
            if not piece:
                continue
            if ":" in piece:
                if current is not None:
                    specs.append(current)
                current = piece
            elif current is not None:
                current += "," + piece
            else:
                specs.append(piece)
        if current is not None:
            specs.append(current)
    return specs


def load_keys_file(path: str | Path) -> list[tuple[str, frozenset[str] | None]]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")):
        data = json.loads(text)
        entries = data.get("keys", []) if isinstance(data, dict) else data
        out = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
                raise KeySpecError(f"{path}: entry {index} needs a non-empty 'key'")
            users = entry.get("users")
            if users is not None and (not isinstance(users, list) or not all(isinstance(u, str) for u in users)):
                raise KeySpecError(f"{path}: entry {index}: 'users' must be a list of user ids or null")
            out.append((entry["key"], None if users is None or "*" in users else frozenset(users)))
        return out
    specs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            specs.append(parse_key_spec(line))
    return specs


class KeyTable:
    """The configured keys. Empty: auth is off."""

    def __init__(self, entries: Iterable[tuple[str, frozenset[str] | None]] = ()):
        self._by_hash: dict[str, KeyScope] = {}
        for key, users in entries:
            digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
            scope = KeyScope(_key_id(key), users)
            previous = self._by_hash.get(digest)
            if previous is not None and previous != scope:
                raise KeySpecError(f"API key {scope.key_id} is configured twice with different users")
            self._by_hash[digest] = scope

    @classmethod
    def from_specs(cls, specs: Iterable[str] | str | None = (), keys_file: str | Path | None = None) -> KeyTable:
        if specs is None:
            specs = []
        elif isinstance(specs, str):
            specs = split_key_list(specs)
        entries = []
        for spec in specs:
            # an item may itself be a comma-separated list (PAD_API_KEY): pass
            # raw strings, never pre-split on commas (that would unbind users)
            entries.extend(parse_key_spec(s) for s in split_key_list(spec))
        if keys_file:
            entries.extend(load_keys_file(keys_file))
        return cls(entries)

    @classmethod
    def from_settings(cls, settings: object) -> KeyTable:
        """From `api_keys` (list of specs, or one comma-separated string) and
        `api_keys_file` of the server settings, when present."""
        return cls.from_specs(getattr(settings, "api_keys", None) or [], getattr(settings, "api_keys_file", None))

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def __len__(self) -> int:
        return len(self._by_hash)

    def scope_of(self, key_id: str) -> KeyScope | None:
        """The scope of the configured key with that id (a resumed batch's
        creator); None when no such key is configured."""
        return next((scope for scope in self._by_hash.values() if scope.key_id == key_id), None)

    def authenticate(self, token: str | None) -> KeyScope | None:
        """The scope of a presented key; None when it is missing or unknown
        (the caller answers 401). Looked up by hash: no timing on the key."""
        if not token:
            return None
        return self._by_hash.get(hashlib.sha256(token.encode("utf-8")).hexdigest())


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check_user(scope: KeyScope | None, user_id: str | None, param: str = "user_id") -> None:
    """Forbidden (403) unless the key may touch `user_id` (scope None: no auth)."""
    if scope is not None and not scope.can_access(user_id):
        raise Forbidden(f"this API key may not access user {user_id!r}", param=param)


def chat_user(scope: KeyScope | None, user: str | None) -> str | None:
    """The effective `user` of a chat request. A key bound to one user
    defaults to it; a key bound to several must name one of them. One
    longer than the store keeps is a 400, not an answer whose record (for
    feedback, or a kept response) is silently lost."""
    if user is not None and len(user) > MAX_USER_CHARS:
        raise InvalidInput(f"user has {len(user)} characters, at most {MAX_USER_CHARS} allowed", param="user")
    if user is not None and "\x00" in user:  # a store key: PostgreSQL text cannot hold NUL
        raise InvalidInput("user must not contain NUL characters", param="user", code="invalid_text")
    if scope is None or scope.users is None:
        return user
    if user is None:
        if len(scope.users) == 1:
            return next(iter(scope.users))
        raise Forbidden("this API key is bound to several users: set 'user' to one of them", param="user")
    check_user(scope, user, param="user")
    return user


def check_admin(scope: KeyScope | None) -> None:
    if scope is not None and not scope.admin:
        raise Forbidden("this endpoint needs an unbound (admin) API key", code="admin_key_required")


def parse_specs(specs: Sequence[str]) -> list[tuple[str, frozenset[str] | None]]:
    """Validates specs (for a settings validator): raises KeySpecError."""
    return [parse_key_spec(s) for s in specs]
