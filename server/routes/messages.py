"""POST /v1/messages (Anthropic's Messages API) and POST
/v1/messages/count_tokens: the request (server/anthropic_models.py) runs as
a chat does (server/generation.py), and this module shapes Anthropic's
`message` object, or its stream of events: message_start, then per content
block content_block_start, content_block_delta (text_delta, or a tool
call's input_json_delta) and content_block_stop, then message_delta (the
stop_reason and the output tokens) and message_stop; an error mid-answer is
an `error` event. Errors before the answer have Anthropic's shape too
(server/anthropic_errors.py). `pad` is on the message (on message_start's
when streamed)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from pad_core.types import ChatRequest
from server.anthropic_errors import AnthropicErrorResponse, anthropic_error
from server.anthropic_models import CountTokensRequest, MessagesRequest
from server.auth import Scope, key_scope
from server.auth_scopes import chat_user
from server.errors import APIError
from server.generation import (
    CallDelta,
    ChoiceState,
    Delta,
    Formatter,
    Generation,
    check_model,
    count_prompt,
    recorder,
    sampling_defaults,
    serve,
    stream_events,
    streaming_response,
    usage_of,
    verify_request,
)
from server.openapi import errors, generation_responses
from server.request_body import JSONRoute
from server.routes.chat import preference_rename, resolve_preferences

router = APIRouter(tags=["anthropic"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

# The engine's names for what the client calls otherwise, in errors.
RENAME = {"response_format": "output_config.format", "stop": "stop_sequences",
          "continue_final_message": "messages (the last, an assistant's prefill)"}


class AnthropicMessageObject(BaseModel):
    """A `message` object (the OpenAPI document's shape of it)."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[dict[str, Any]]
    model: str
    stop_reason: str | None
    stop_sequence: str | None
    usage: dict[str, Any]


class TokenCount(BaseModel):
    input_tokens: int


MESSAGES_RESPONSES = generation_responses(
    AnthropicMessageObject, "a message, or with stream: true a text/event-stream of message events",
    AnthropicErrorResponse)


def chat_of(body: MessagesRequest, state, request_id: str, resolution) -> ChatRequest:
    messages = body.engine_messages()
    return ChatRequest(request_id, messages, resolution.preferences, body.to_sampling_params(sampling_defaults(state)),
                       body.to_guidance_params(), body.to_structured(), body.to_template(messages))


def renames(body: MessagesRequest) -> dict[str, str]:
    """The engine's names of the request's fields -> the client's, in errors."""
    tools = {}
    for index in range(len(body.tools or ())):
        tools |= {f"tools[{index}].function.parameters": f"tools[{index}].input_schema",
                  f"tools[{index}].function.name": f"tools[{index}].name", f"tools[{index}].function": f"tools[{index}]"}
    return {**tools, **RENAME, **preference_rename(body)}


@router.post("/v1/messages", response_model=None, responses=MESSAGES_RESPONSES)
async def create_message(body: MessagesRequest, request: Request, scope: Scope):
    return await serve(request, _answer(body, request, scope))


async def _answer(body: MessagesRequest, request: Request, scope):
    state = request.app.state
    served = check_model(state, body.model)
    user = chat_user(scope, body.user)
    resolution = await resolve_preferences(state, body, user)
    message_id = f"msg_{uuid.uuid4().hex}"
    chat = chat_of(body, state, f"{message_id}-0", resolution)
    generation = Generation(state, message_id, served, [chat], [ChoiceState.of(0, chat.structured)], resolution)
    rename = renames(body)
    verify_request(chat, state.settings, resolution, user, rename)
    generation.rename = rename
    await generation.start()
    record = recorder(state, generation, chat.messages, user)
    formatter = MessagesFormatter()
    if body.stream:
        return streaming_response(stream_events(generation, formatter, record), on_close=[generation.close])
    choices = await generation.collect()
    await record(choices)
    return JSONResponse(formatter.message(generation, choices[0], usage_of(choices)))


@router.post("/v1/messages/count_tokens", response_model=TokenCount,
             responses=errors(400, 401, 403, 404, 413, 429, 503, body=AnthropicErrorResponse))
async def count_tokens(body: CountTokensRequest, request: Request, scope: Scope) -> dict[str, int]:
    """The tokens the request's prompt is for the model (the `input_tokens`
    its answer reports), rendered by the worker as it would run it."""
    state = request.app.state
    check_model(state, body.model)
    user = chat_user(scope, body.user)
    resolution = await resolve_preferences(state, body, user)
    chat = chat_of(body, state, "count_tokens", resolution)
    return {"input_tokens": await count_prompt(state, chat, resolution, user, renames(body))}


# ---- the message and its events -----------------------------------------
def stop_reason(choice: ChoiceState) -> str | None:
    if choice.finish_reason == "tool_calls":
        return "tool_use"
    if choice.finish_reason == "length":
        return "max_tokens"
    if choice.finish_reason == "stop":
        return "stop_sequence" if isinstance(choice.stop_reason, str) else "end_turn"
    return None


def stop_sequence(choice: ChoiceState) -> str | None:
    return choice.stop_reason if isinstance(choice.stop_reason, str) else None


def anthropic_usage(usage: dict, output_tokens: int | None = None) -> dict:
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": usage["prompt_tokens"] - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": usage["completion_tokens"] if output_tokens is None else output_tokens}


def tool_use_block(call: dict, arguments: dict | None = None) -> dict:
    """An OpenAI-shaped call as a tool_use block (`arguments` given, or its
    own parsed; those of a call cut short do not parse: {})."""
    if arguments is None:
        try:
            arguments = json.loads(call["function"]["arguments"] or "{}")
        except ValueError:
            arguments = {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": arguments}


class MessagesFormatter(Formatter):
    def __init__(self) -> None:
        self.started = False  # message_start sent (with the first delta: the prompt's tokens are known then)
        self.block: int | None = None  # the open content block's index
        self.blocks = 0  # content blocks opened so far

    def envelope(self, generation: Generation, content: list[dict], choice: ChoiceState | None,
                 usage: dict) -> dict:
        return {"id": generation.id, "type": "message", "role": "assistant", "model": generation.model,
                "content": content, "stop_reason": None if choice is None else stop_reason(choice),
                "stop_sequence": None if choice is None else stop_sequence(choice), "usage": usage,
                "pad": generation.pad_info()}

    def message(self, generation: Generation, choice: ChoiceState, usage: dict) -> dict:
        # The calls (those begun, when max_tokens or a stop cut them short), else the text.
        content = [tool_use_block(call) for call in choice.answer_calls or ()]
        content = content or [{"type": "text", "text": choice.text}]  # (as a stream's: one block at least)
        return self.envelope(generation, content, choice, anthropic_usage(usage))

    @staticmethod
    def event(kind: str, **data: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"

    def start(self, generation: Generation, choice: ChoiceState) -> list[str]:
        if self.started:
            return []
        self.started = True
        usage = anthropic_usage(usage_of([choice]), output_tokens=0)
        return [self.event("message_start", message=self.envelope(generation, [], None, usage)),
                self.event("ping")]

    def open_block(self, block: dict) -> list[str]:
        events = self.close_block()
        self.block, self.blocks = self.blocks, self.blocks + 1
        return events + [self.event("content_block_start", index=self.block, content_block=block)]

    def close_block(self) -> list[str]:
        if self.block is None:
            return []
        index, self.block = self.block, None
        return [self.event("content_block_stop", index=index)]

    def call_events(self, choice: ChoiceState, call: CallDelta) -> list[str]:
        """A call's announcement opens its tool_use block; its arguments
        come as input_json_delta fragments; its end closes the block."""
        if call.name is not None:
            events = self.open_block(tool_use_block(choice.streamed_calls[call.index], {}))
            if call.arguments:
                events.append(self.event("content_block_delta", index=self.block,
                                         delta={"type": "input_json_delta", "partial_json": call.arguments}))
            return events
        if call.done:
            return self.close_block()
        return [self.event("content_block_delta", index=self.block,
                           delta={"type": "input_json_delta", "partial_json": call.arguments})]

    def delta(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[str]:
        events = self.start(generation, choice)
        if delta.text:
            if self.block is None:
                events += self.open_block({"type": "text", "text": ""})
            events.append(self.event("content_block_delta", index=self.block,
                                     delta={"type": "text_delta", "text": delta.text}))
        for call in delta.calls:
            events += self.call_events(choice, call)
        return events

    def closing(self, generation: Generation, usage: dict) -> list[str]:
        choice = generation.choices[0]
        events = self.start(generation, choice)  # an answer with no delta at all (none: an empty text)
        if self.blocks == 0:
            events += self.open_block({"type": "text", "text": ""})
        events += self.close_block()
        events.append(self.event("message_delta", delta={"stop_reason": stop_reason(choice),
                                                         "stop_sequence": stop_sequence(choice)},
                                 usage={"output_tokens": usage["completion_tokens"]}))
        return events + [self.event("message_stop")]

    def error(self, generation: Generation, error: APIError) -> list[str]:
        return [self.event("error", error=anthropic_error(error.status, error.message))]

    def done(self) -> list[str]:
        return []  # the stream ends with message_stop (or error), no [DONE]
