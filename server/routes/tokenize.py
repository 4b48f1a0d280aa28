"""POST /tokenize and POST /detokenize, as vLLM serves them (TGI and the
llama.cpp server have their own): the served model's tokenizer, so a
client can count a prompt's tokens exactly as a request would be given to
the model (chat messages flattened as /v1/chat/completions flattens them,
through the chat template) and turn token ids back into text.

The count is the base context's: a preference adds reward contexts of
their own, which the context length check of a chat request covers. The
worker tokenizes (the gateway holds no tokenizer), in its tokenizer thread,
so a huge prompt never stalls the streams decoding."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, model_validator

from pad_core.types import TemplateOptions
from pad_core.validation import INT64_MAX
from server.auth import key_scope
from server.errors import invalid, unavailable
from server.generation import ask_worker, check_model
from server.messages import chat_messages
from server.openai_models import ChatMessage, StrictRequest, ToolDefinition, function_tools, tool_output
from server.openapi import errors
from server.request_body import JSONRoute

router = APIRouter(tags=["tokenize"], route_class=JSONRoute, dependencies=[Depends(key_scope)])


class TokenizeRequest(StrictRequest):
    model: str | None = Field(None, description="the served model (optional)")
    prompt: str | None = Field(None, description="raw text, as /v1/completions takes it (no chat template)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="a chat, as /v1/chat/completions takes it")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant's turn opening")
    continue_final_message: bool = Field(False, description="messages: leave the last message open (as a chat "
                                         "request with continue_final_message renders it)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="messages: more variables for the "
                                                         "chat template")
    add_special_tokens: bool | None = Field(
        None, description="the tokenizer's special tokens (BOS...); default true for a prompt, false for messages "
                          "(the chat template writes its own)")
    return_token_strs: bool = Field(False, description="also the tokens as the tokenizer's strings")
    tools: list[ToolDefinition] | None = Field(None, description="messages: the tools, as a chat request gives "
                                               "them (their description is part of the prompt)")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="messages: as in a chat request (it changes how the tools are described)")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools",
                     "tool_choice"):
            if self.prompt is not None and name in self.model_fields_set:
                raise ValueError(f"'{name}' applies to 'messages' only")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictRequest):
    model: str | None = None
    # Bounded by the body limit (PAD_MAX_REQUEST_BYTES); ids past the vocabulary are a 400 in the route.
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] = Field(description="token ids of the served model")


class DetokenizeResponse(BaseModel):
    prompt: str


def worker_payload(body: TokenizeRequest) -> dict:
    """What the worker tokenizes: engine messages (flattened as a chat
    request's are; its tools described as a chat request's are) or the raw
    prompt."""
    if body.messages is not None:
        messages = chat_messages(body.messages)
        # Checked here too (the worker checks again): what cannot cross the IPC
        # (an integer beyond int64, say) must be a 400, not a failed send.
        TemplateOptions(body.add_generation_prompt, body.continue_final_message,
                        body.chat_template_kwargs or {}).verify(messages)
        calls = tool_output(function_tools(body.tools), body.tool_choice, None)
        return {"kind": "chat", "messages": messages,
                "tools": None if calls is None else [dataclasses.asdict(tool) for tool in calls.tools],
                "tool_choice": None if calls is None else calls.tool_choice,
                "optional_tools": calls is not None and calls.auto,
                "add_generation_prompt": body.add_generation_prompt,
                "continue_final_message": body.continue_final_message,
                "chat_template_kwargs": body.chat_template_kwargs or {},
                "add_special_tokens": bool(body.add_special_tokens), "return_token_strs": body.return_token_strs}
    return {"kind": "text", "prompt": body.prompt,
            "add_special_tokens": body.add_special_tokens is not False, "return_token_strs": body.return_token_strs}


@router.post("/tokenize", response_model=TokenizeResponse, responses=errors(400, 401, 404, 413, 429, 503))
async def tokenize(body: TokenizeRequest, request: Request):
    state = request.app.state
    if body.model is not None:
        check_model(state, body.model)
    result = await ask_worker(state, worker_payload(body))
    result["max_model_len"] = state.worker.model_info.get("context_length", 0)
    return result


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors(400, 401, 404, 413, 429, 503))
async def detokenize(body: DetokenizeRequest, request: Request):
    state = request.app.state
    if body.model is not None:
        check_model(state, body.model)
    vocab_size = state.worker.model_info.get("vocab_size")
    for index, token in enumerate(body.tokens):
        if vocab_size is not None and not 0 <= token < vocab_size:
            raise invalid(f"tokens[{index}] = {token} is not a token id of this model (0 to {vocab_size - 1})",
                          f"tokens[{index}]")
    return await ask_worker(state, {"kind": "detokenize", "tokens": body.tokens})


@router.get("/tokenizer_info", responses=errors(401, 503))
async def get_tokenizer_info(request: Request) -> dict:
    """vLLM's tokenizer info: the special tokens, the chat template and the
    context length (what lm-evaluation-harness's `tokenizer_backend=remote`,
    its default where a server has it, needs besides /tokenize)."""
    info = request.app.state.worker.model_info.get("tokenizer")
    if info is None:
        raise unavailable("the worker is not ready yet")
    return info


