"""POST /v1/chat/completions: the request model builds the engine's
parameters (server/openai_models.py), server/generation.py runs them, and
this module only shapes chat.completion(.chunk) objects."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pad_core.types import ChatRequest
from server.auth import Scope, key_scope
from server.auth_scopes import chat_user
from server.generation import (
    CallDelta,
    ChoiceState,
    ChunkFormatter,
    Delta,
    Generation,
    check_fan_out,
    check_model,
    logprob_entry,
    recorder,
    sampling_defaults,
    serve,
    stream_events,
    streaming_response,
    usage_of,
    verify_request,
    vllm_prompt_logprobs,
)
from server.messages import chat_messages
from server.openai_models import ChatCompletion, ChatCompletionRequest
from server.openapi import generation_responses
from server.request_body import JSONRoute
from server.request_id import adopt_body_request_id
from server.routes.stored_completions import keep_chat_completion
from server.store.resolve import UNSET, resolve_for_request

router = APIRouter(tags=["chat"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

CHAT_RESPONSES = generation_responses(
    ChatCompletion, "a chat.completion, or with stream: true a text/event-stream of chat.completion.chunk")


async def resolve_preferences(state, body, user: str | None):
    asked = body.preference if "preference" in body.model_fields_set else UNSET
    return await resolve_for_request(getattr(state, "store", None), user, asked)


def preference_rename(body) -> dict[str, str]:
    return {"preference[0]": "preference"} if isinstance(body.preference, str) else {}


@router.post("/v1/chat/completions", response_model=None, responses=CHAT_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, scope: Scope):
    return await serve(request, _chat(body, request, scope))


async def _chat(body: ChatCompletionRequest, request: Request, scope):
    state = request.app.state
    served = check_model(state, body.model)
    check_fan_out(state, body.n)
    body.refuse_unsupported()
    adopt_body_request_id(request, body.request_id)
    structured = body.to_structured()
    messages = chat_messages(body.messages)
    user = chat_user(scope, body.user)
    resolution = await resolve_preferences(state, body, user)
    guidance = body.to_guidance_params()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    template = body.to_template()
    defaults = sampling_defaults(state)
    requests = [ChatRequest(f"{completion_id}-{i}", messages, resolution.preferences,
                            body.to_sampling_params(i, defaults), guidance, structured, template, body.priority)
                for i in range(body.n)]
    generation = Generation(state, completion_id, served, requests,
                            [ChoiceState.of(i, structured) for i in range(body.n)], resolution)
    rename = preference_rename(body)
    if body.max_completion_tokens is not None:
        rename["max_tokens"] = "max_completion_tokens"
    verify_request(requests[0], state.settings, resolution, user, rename)  # the others differ in the seed alone
    generation.rename = rename
    await generation.start()
    record = recorder(state, generation, messages, user)
    formatter = ChatFormatter(body, echoed(body, messages))

    async def finished(choices: list[ChoiceState]) -> dict:
        """Kept for feedback and, with store, as a stored chat completion
        (a stream's as the whole object its chunks add up to)."""
        await record(choices)
        completion = formatter.response(generation, choices)
        await keep_chat_completion(state, body, completion, user)
        return completion

    if body.stream:
        return streaming_response(stream_events(generation, formatter, finished), on_close=[generation.close])
    return JSONResponse(await finished(await generation.collect()))


def echoed(body: ChatCompletionRequest, messages: list[dict[str, str]]) -> str:
    """vLLM's chat `echo`: the answer opens with the last message when it is
    the assistant's own (a prefilled answer, with continue_final_message)."""
    if not body.echo or messages[-1].get("role") != "assistant":
        return ""
    return messages[-1].get("content") or ""


class ChatFormatter(ChunkFormatter):
    chunk_object = "chat.completion.chunk"
    body: ChatCompletionRequest

    def __init__(self, body: ChatCompletionRequest, echo: str = ""):
        super().__init__(body)
        self.echo = echo

    def opening(self, generation: Generation) -> list[str]:
        """A chunk per choice with its role (content null before tool calls, as
        OpenAI's; the echoed message where asked), as OpenAI and vLLM send
        them; the first also carries `pad` (what personalized the answer) and
        with return_token_ids the prompt's token ids (vLLM's, once)."""
        chunks = []
        for number, choice in enumerate(generation.choices):
            role = {"index": choice.index, "delta": {"role": "assistant",
                                                     "content": None if choice.holds_calls else self.echo},
                    "logprobs": None, "finish_reason": None}
            first = {"pad": generation.pad_info(), **self.prompt_ids(generation.choices)} if number == 0 else {}
            chunks.append(self.chunk(generation, [role], **first))
        return chunks

    def prompt_ids(self, choices: list[ChoiceState]) -> dict:
        """vLLM's top-level prompt_token_ids, when asked (the n choices share the prompt)."""
        return {"prompt_token_ids": choices[0].prompt_token_ids} if self.body.return_token_ids else {}

    def delta(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[str]:
        """A chunk per call delta (as OpenAI's: a call's announcement, then its
        arguments' fragments), then the text, logprobs and finish reason;
        the token ids since the last chunk on the last (return_token_ids)."""
        parts = [{"index": choice.index, "delta": call_delta, "logprobs": None, "finish_reason": None}
                 for call in delta.calls if call.on_the_wire and (call_delta := self.call_delta(call))]
        if delta.text or delta.logprobs or delta.finish_reason:
            logprobs = [logprob_entry(lp, bool(self.body.return_tokens_as_token_ids)) for lp in delta.logprobs]
            reason = delta.finish_reason
            if reason == "tool_calls" and self.body.legacy_functions:
                reason = "function_call"
            parts.append({"index": choice.index, "delta": {"content": delta.text} if delta.text else {},
                          "logprobs": {"content": logprobs} if logprobs else None, "finish_reason": reason,
                          **({"stop_reason": choice.stop_reason} if reason is not None else {})})
        if not parts:  # a call's end alone (Responses' .done): its ids go with the next chunk
            choice.defer_ids(delta.token_ids)
        elif self.body.return_token_ids:  # every chunk of the choice carries the field, as vLLM's
            for part in parts:
                part["token_ids"] = delta.token_ids if part is parts[-1] else []
        return [self.chunk(generation, [part]) for part in parts]

    def call_delta(self, call: CallDelta) -> dict:
        """A call delta as a chunk's delta: `tool_calls` (the id, type and name
        once, in the announcement, since stream accumulators concatenate
        every string they are sent again), or the deprecated functions API's
        `function_call` (one call: the answer allows no second)."""
        if self.body.legacy_functions:
            if call.index:
                return {}
            named = {"name": call.name} if call.name is not None else {}
            return {"function_call": {**named, "arguments": call.arguments}}
        if call.name is None:
            return {"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]}
        return {"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}]}

    def message(self, choice: ChoiceState) -> tuple[dict, str | None]:
        calls = choice.answer_calls
        if calls is None:
            return {"role": "assistant", "content": self.echo + choice.text, "refusal": None}, choice.finish_reason
        # The engine's calls ("tool_calls"), or those begun before max_tokens or a stop cut them short.
        reason = "tool_calls" if choice.tool_calls is not None else choice.finish_reason
        message = {"role": "assistant", "content": None, "refusal": None}
        if not calls:
            return message, reason
        if self.body.legacy_functions:
            call = calls[0]["function"]
            return {**message, "function_call": {"name": call["name"], "arguments": call["arguments"]}}, \
                "function_call" if reason == "tool_calls" else reason
        return {**message, "tool_calls": calls}, reason

    def response(self, generation: Generation, choices: list[ChoiceState]) -> dict:
        out = []
        for choice in choices:
            message, finish_reason = self.message(choice)
            as_ids = bool(self.body.return_tokens_as_token_ids)
            logprobs = {"content": [logprob_entry(lp, as_ids) for lp in choice.logprobs]} if self.body.logprobs else None
            out.append({"index": choice.index, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason, "stop_reason": choice.stop_reason,
                        **({"token_ids": choice.token_ids} if self.body.return_token_ids else {})})
        extra = self.prompt_ids(choices)
        if self.body.prompt_logprobs is not None:  # vLLM's: the prompt's, once (the n choices share it)
            extra["prompt_logprobs"] = vllm_prompt_logprobs(choices[0].prompt_logprobs, self.body.prompt_logprobs)
        return {"id": generation.id, "object": "chat.completion", "created": generation.created,
                "model": generation.model, "choices": out, "usage": usage_of(choices), "pad": generation.pad_info(),
                **extra}
