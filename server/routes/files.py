"""OpenAI's Files API, as far as the Batch API needs it (`client.files`):
POST /v1/files (multipart: `file` and `purpose`) keeps a file, GET
/v1/files lists them (`purpose`, `order`, `limit`, `after`), GET
/v1/files/{id} and /v1/files/{id}/content read one, DELETE forgets it.

Files are kept in the store (every gateway over it reads them) until
deleted, or until they expire (OpenAI's `expires_after`: 1 hour to 30 days
after their creation; a `batch` file's default is 30 days, as OpenAI's, and
a running batch's input is kept until it ends), up to PAD_MAX_FILE_BYTES
each. A file belongs to its key's user as
a kept response does (a key bound to several users names it with a `user`
form field, a PAD extension); another user's file is a 404, as an unknown one."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile

from server import batches
from server.auth import Scope, key_scope
from server.auth_scopes import KeyScope, chat_user
from server.errors import APIError, invalid
from server.openai_models import StrictRequest
from server.openapi import errors
from server.request_body import JSONRoute
from server.routes.stored_responses import item_list
from server.store.records import StoredFile

router = APIRouter(tags=["files"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
HIDDEN_PURPOSES = (batches.MESSAGE_BATCH_INPUT, batches.MESSAGE_BATCH_OUTPUT)  # a Message Batch's own files
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400  # OpenAI's bounds on a file's expiry: 1 hour to 30 days
BATCH_FILE_EXPIRY_S = MAX_EXPIRY_S  # OpenAI's default for purpose batch (others are kept until deleted)
MAX_FILE_PAGE = 10_000  # OpenAI's
MAX_FILENAME = 512

FILE_OBJECT = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "file"},
                                                "bytes": {"type": "integer"}, "created_at": {"type": "integer"},
                                                "expires_at": {"type": ["integer", "null"]},
                                                "filename": {"type": "string"}, "purpose": {"type": "string"}}}
UPLOAD_BODY = {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": list(PURPOSES)},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRY_S, "maximum": MAX_EXPIRY_S},
                   "user": {"type": "string", "description": "PAD: the file's user, for a key bound to several"}}}}},
    "required": True}


class ExpiresAfter(StrictRequest):
    """OpenAI's expiry policy of a file (`expires_after` of an upload,
    `output_expires_after` of a batch)."""

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRY_S, le=MAX_EXPIRY_S, description="after the anchor: 1 hour to 30 days")


async def expiry_of(form, purpose: str) -> int | None:
    """The seconds after its creation an uploaded file expires: the form's
    `expires_after[anchor]` and `expires_after[seconds]` (as the SDKs send
    it), else the purpose's default; None: kept until deleted."""
    anchor, seconds = await form_text(form, "expires_after[anchor]"), await form_text(form, "expires_after[seconds]")
    if anchor is None and seconds is None:
        return BATCH_FILE_EXPIRY_S if purpose == "batch" else None
    try:  # a form's fields are text
        return ExpiresAfter(anchor=anchor, seconds=int(seconds) if seconds and seconds.isdigit() else seconds).seconds
    except ValidationError:
        raise invalid(f"expires_after needs anchor 'created_at' and seconds, an integer from {MIN_EXPIRY_S} "
                      f"(1 hour) to {MAX_EXPIRY_S} (30 days)", "expires_after") from None


def file_not_found(file_id: str, param: str = "file_id") -> APIError:
    return APIError(404, f"No such File object: {file_id[:80]!r}", "invalid_request_error", param, "file_not_found")


async def find_file(request: Request, scope: KeyScope | None, file_id: str, param: str = "file_id") -> StoredFile:
    """The file, if the caller's key may read it; else a 404 (a Message
    Batch's own files too: deleting one would lose its results)."""
    found = await request.app.state.store.find_file(file_id)
    if found is None or found.purpose in HIDDEN_PURPOSES or (scope is not None and not scope.can_access(found.user_id)):
        raise file_not_found(file_id, param)
    return found


async def form_text(form, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(f"{name} must be a text field, not a file", name)
    return value


@router.post("/v1/files", responses={**errors(400, 401, 403, 413, 503), 200: {
    "description": "the file object", "content": {"application/json": {"schema": FILE_OBJECT}}}},
    openapi_extra={"requestBody": UPLOAD_BODY})
async def upload_file(request: Request, scope: Scope) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise invalid("POST /v1/files takes multipart/form-data with a `file` and a `purpose`", "file")
    async with request.form(max_files=1, max_fields=8) as form:
        purpose = await form_text(form, "purpose")
        if purpose not in PURPOSES:
            raise invalid(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
        expires_s = await expiry_of(form, purpose)
        user = chat_user(scope, await form_text(form, "user"))
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid("file is required: the file's content as a multipart file part", "file")
        content = await upload.read()
        filename = upload.filename or "file"
    if len(filename) > MAX_FILENAME or "\x00" in filename:
        raise invalid(f"the file's name must be at most {MAX_FILENAME} characters, without NUL", "file")
    created = int(time.time())
    file = StoredFile(f"file-{uuid.uuid4().hex}", user, purpose, filename, len(content), created,
                      None if expires_s is None else created + expires_s)
    await request.app.state.store.record_file(file, content)
    return file.to_openai()


@router.get("/v1/files", responses=errors(400, 401))
async def list_files(request: Request, scope: Scope, purpose: str | None = None, limit: int = MAX_FILE_PAGE,
                     order: Literal["asc", "desc"] = "desc", after: str | None = None) -> dict[str, Any]:
    if not 1 <= limit <= MAX_FILE_PAGE:
        raise invalid(f"limit must be between 1 and {MAX_FILE_PAGE}", "limit", "invalid_value")
    files, more = await request.app.state.store.list_files(
        users=None if scope is None else scope.users, purpose=purpose, after=after, limit=limit,
        descending=order == "desc", hidden_purposes=HIDDEN_PURPOSES)
    return item_list([f.to_openai() for f in files], more)


@router.get("/v1/files/{file_id}", responses={**errors(401, 404), 200: {
    "description": "the file object", "content": {"application/json": {"schema": FILE_OBJECT}}}})
async def retrieve_file(file_id: str, request: Request, scope: Scope) -> dict[str, Any]:
    return (await find_file(request, scope, file_id)).to_openai()


@router.get("/v1/files/{file_id}/content", response_class=Response, responses={**errors(401, 404), 200: {
    "description": "the file's bytes", "content": {"application/octet-stream": {"schema": {"type": "string"}}}}})
async def file_content(file_id: str, request: Request, scope: Scope) -> Response:
    await find_file(request, scope, file_id)
    content = await request.app.state.store.file_content(file_id)
    if content is None:  # deleted meanwhile
        raise file_not_found(file_id)
    return Response(content, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", responses=errors(401, 404))
async def delete_file(file_id: str, request: Request, scope: Scope) -> dict[str, Any]:
    await find_file(request, scope, file_id)
    if not await request.app.state.store.delete_file(file_id):
        raise file_not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
