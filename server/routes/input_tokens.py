"""POST /v1/responses/input_tokens (OpenAI's `client.responses.input_tokens.count`):
how many tokens a Responses request's input is for the model, without
answering it. The prompt is built as POST /v1/responses builds it
(`instructions`, then a `previous_response_id`'s or a `conversation`'s
items, then `input`, item references resolved; function `tools` written
into the prompt as a tool-call request writes them) and tokenized by the
worker through the chat template, so the count is the `usage.input_tokens`
a response to the same request would report.

As /tokenize counts, it is the base context's: a `preference` (not a field
here) adds reward contexts of their own. The count is of the whole input:
`truncation: "auto"` would drop the oldest items only from an input that
does not fit, which a count is often asked to find out."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from pad_core.errors import InvalidRequestError
from pad_core.types import ChatRequest, RequestLimits
from server.auth import Scope, key_scope
from server.errors import APIError
from server.generation import check_model, sampling_defaults
from server.messages import response_input_messages
from server.openapi import errors
from server.request_body import JSONRoute
from server.responses_models import ResponsesRequest
from server.routes.responses import continued_conversation, conversation_messages
from server.routes.stored_responses import previous_response, resolve_item_references
from server.routes.tokenize import ask_worker

router = APIRouter(tags=["responses"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

RENAME = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class InputTokensRequest(ResponsesRequest):
    """The fields of a Responses request that make its input (the others a
    request may carry are accepted and change nothing)."""

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
    previous = await previous_response(store, scope, body.previous_response_id)
    items = await resolve_item_references(store, scope, body.input if body.input is not None else [])
    if conversation is not None:
        earlier, call_names = await conversation_messages(store, conversation)
    else:
        earlier, call_names = (previous.conversation, previous.call_names) if previous else ((), None)
    messages = response_input_messages(items, body.instructions, earlier, call_names)
    structured = body.to_structured()
    counted = ChatRequest("input_tokens", messages, [], body.to_sampling_params(sampling_defaults(state)),
                          structured=structured)
    try:  # the request's own bounds, as a response's (what cannot cross to the worker is a 400 here)
        counted.verify(RequestLimits.from_settings(state.settings))
    except InvalidRequestError as exc:
        raise APIError.from_invalid(exc, RENAME) from None
    result = await ask_worker(state, {"kind": "chat", "messages": messages, "add_generation_prompt": True,
                                      "structured": structured.to_dict() if structured is not None else None})
    return {"object": "response.input_tokens", "input_tokens": result["count"]}
