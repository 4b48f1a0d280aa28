"""POST /v1/responses/input_tokens (OpenAI's `client.responses.input_tokens.count`):
how many tokens a Responses request's input is for the model, without
answering it. The request is built as POST /v1/responses builds it
(`instructions`, then a `previous_response_id`'s or a `conversation`'s
items, then `input`, item references resolved; the preference, the
request's or the user's stored one; function `tools`; `truncation`) and the
worker renders it as it would run it (PadEngine.count_chat), so the count is
the `usage.input_tokens` a response to the same request reports, and a
request a response would refuse is refused alike. One exception: an input
longer than the context is counted, not refused (finding that out is what
a count is often for).

"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from pad_core.types import ChatRequest
from server.auth import Scope, key_scope
from server.auth_scopes import chat_user
from server.generation import check_model, count_prompt, sampling_defaults
from server.openapi import errors
from server.request_body import JSONRoute
from server.responses_models import ResponsesRequest
from server.routes.chat import preference_rename, resolve_preferences
from server.routes.responses import continued_conversation, input_messages

router = APIRouter(tags=["responses"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

RENAME = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class InputTokensRequest(ResponsesRequest):
    """A Responses request, every field of it accepted: those that shape
    the prompt count (input, instructions, tools, preference and pad,
    truncation with max_output_tokens), the others change nothing."""

    input: str | list[dict[str, Any]] | None = Field(None, description="text, or message / function_call / "
                                                     "function_call_output items")
    personality: str | None = Field(None, description="accepted and ignored")


class InputTokenCount(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


@router.post("/v1/responses/input_tokens", response_model=InputTokenCount,
             responses=errors(400, 401, 403, 404, 413, 429, 503))
async def count_input_tokens(body: InputTokensRequest, request: Request, scope: Scope) -> dict[str, Any]:
    state = request.app.state
    if body.model is not None:
        check_model(state, body.model)
    body.refuse_unsupported()
    store = getattr(state, "store", None)
    conversation = await continued_conversation(store, scope, body.conversation_id())
    _, _, messages = await input_messages(store, scope, body, conversation)
    user = chat_user(scope, body.user)
    resolution = await resolve_preferences(state, body, user)
    chat = ChatRequest("input_tokens", messages, resolution.preferences, body.to_sampling_params(sampling_defaults(state)),
                       body.to_guidance_params(), body.to_structured(), drop_oldest_messages=body.truncation == "auto")
    count = await count_prompt(state, chat, resolution, user, {**RENAME, **preference_rename(body)})
    return {"object": "response.input_tokens", "input_tokens": count}
