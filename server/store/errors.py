"""Store errors. Each carries what an OpenAI-shaped HTTP error needs
(status, type, param, code), so the routes map them one to one."""

from __future__ import annotations


class StoreError(Exception):
    status = 400
    type = "invalid_request_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidInput(StoreError):
    """Bad or oversized input (400)."""

    status = 400


class NotFound(StoreError):
    """Unknown user profile or completion id (404)."""

    status = 404
    default_code = "not_found"


class Forbidden(StoreError):
    """An API key bound to some users touched another user (403)."""

    status = 403
    type = "permission_error"
    default_code = "user_not_allowed"


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server than this one."""
