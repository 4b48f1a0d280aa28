"""The Responses API request (POST /v1/responses): text in, text out (or
forced function calls, or JSON by `text.format`), streamed as OpenAI's
typed events or returned whole. `store` (default true) keeps the response
and `previous_response_id` continues a kept one (server/routes/
stored_responses.py); `conversation` reads and extends a kept conversation
(server/routes/conversations.py)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pad_core.types import GuidanceParams, SamplingParams, StructuredOutput, ToolFunction
from pad_core.validation import INT64_MAX, MAX_TEMPERATURE, MAX_TOP_LOGPROBS
from server.errors import invalid
from server.openai_models import (
    DefaultsOf,
    Metadata,
    PadOptions,
    Preferences,
    StrictRequest,
    reject_if,
    guidance_of,
    tool_output,
    with_answer_format,
)


OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for the answer's logprobs

class ResponsesStreamOptions(StrictRequest):
    include_obfuscation: bool | None = Field(None, description="accepted and ignored")


class ResponseTextConfig(StrictRequest):
    format: dict[str, Any] | None = Field(None, description="{'type': 'text' | 'json_object' | 'json_schema', ...}")
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="accepted and ignored")


class ResponsesRequest(StrictRequest):
    model: str | None = Field(None, description="the served model's name; vLLM lets it be left out (the served "
                              "model), as here")
    input: str | list[dict[str, Any]] = Field(description="text, or message / function_call / "
                                              "function_call_output items")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    text: ResponseTextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    store: bool | None = Field(None, description="keep the response (default true): GET /v1/responses/{id}, "
                               "previous_response_id")
    previous_response_id: str | None = Field(None, description="continue a kept response's conversation (its "
                                             "instructions and preference do not carry over)")
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="auto: where the conversation would not fit the context, its oldest items leave "
        "(instructions stay); disabled (the default): a 400")
    conversation: str | dict[str, Any] | None = Field(
        None, description="a conversation's id (or {id}): its items go before input, and input and the answer's "
        "items are added to it")
    background: bool | None = Field(None, description="true: answered after the request returns (queued), "
                                    "polled with GET /v1/responses/{id}; needs store. With stream: its events "
                                    "stream as it runs, and can be read again with GET "
                                    "/v1/responses/{id}?stream=true&starting_after=N")
    # Refused unless null.
    prompt: dict[str, Any] | None = Field(None, description="refused: no stored prompts")
    moderation: dict[str, Any] | None = Field(None, description="refused unless null: no moderation here")
    # Accepted and ignored.
    metadata: Metadata | None = None
    include: list[str] | None = Field(None, description=f"{OUTPUT_LOGPROBS!r} returns the answer's logprobs "
                                      "(with top_logprobs alternatives); the others are accepted and ignored")
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None
    max_tool_calls: int | None = Field(None, ge=1, le=INT64_MAX)
    background_options: dict[str, Any] | None = None
    access_programs: dict[str, Any] | None = None
    image: dict[str, Any] | None = None
    # PAD extensions.
    preference: Preferences = None
    pad: PadOptions | None = None

    def refuse_unsupported(self) -> None:
        reject_if(self.conversation is not None and self.previous_response_id is not None,
                   "conversation and previous_response_id cannot be used together", "conversation", "invalid_value")
        reject_if(self.prompt is not None, "prompt (a stored prompt template) is not supported", "prompt")
        reject_if(bool(self.background) and self.store is False, "background responses need store: true (they "
                  "are read back with GET /v1/responses/{id})", "background", "invalid_value")
        reject_if(self.moderation is not None, "'moderation' is not supported: no moderation here", "moderation")
        reject_if(self.stream_options is not None and not self.stream,
                   "stream_options is only allowed when stream is true", "stream_options", "invalid_value")

    def conversation_id(self) -> str | None:
        """`conversation`'s id: the id itself, or {"id": ...}."""
        conversation = self.conversation
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
            reject_if(not isinstance(conversation, str), "conversation.id must be a conversation's id (a string)",
                       "conversation.id", "invalid_value")
        return conversation

    def to_sampling_params(self, defaults: Mapping[str, float | int] = MappingProxyType({})) -> SamplingParams:
        """A field left out takes the model's default (its generation config), then OpenAI's."""
        default = DefaultsOf(defaults)
        return SamplingParams(
            max_tokens=self.max_output_tokens,
            temperature=default.of("temperature", self.temperature, 1.0),
            top_p=default.of("top_p", self.top_p, 1.0),
            top_k=max(0, default.of("top_k", None, 0)),
            min_p=default.of("min_p", None, 0.0),
            repetition_penalty=default.of("repetition_penalty", None, 1.0),
            # OpenAI's and vLLM's rule: logprobs only when `include` asks for them (top_logprobs alone gives none)
            logprobs=OUTPUT_LOGPROBS in (self.include or ()),
            top_logprobs=self.top_logprobs or 0,
        )

    def to_guidance_params(self) -> GuidanceParams:
        return guidance_of(self.pad)

    def function_tools(self) -> list[ToolFunction]:
        out = []
        for index, tool in enumerate(self.tools or ()):
            name = tool.get("name")
            reject_if(tool.get("type") != "function" or not isinstance(name, str),
                       f"tools[{index}]: only function tools are supported (type 'function' with a name), "
                       f"not {tool.get('type')!r}", f"tools[{index}].type")
            parameters = tool.get("parameters")
            reject_if(parameters is not None and not isinstance(parameters, dict),
                       f"tools[{index}].parameters must be a JSON Schema object", f"tools[{index}].parameters",
                       "invalid_value")
            description = tool.get("description")
            out.append(ToolFunction(name, description if isinstance(description, str) else None, parameters,
                                    tool.get("strict") is True))
        return out

    def text_format(self) -> StructuredOutput | None:
        fmt = (self.text.format if self.text else None) or {"type": "text"}
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutput("json_object")
        if kind == "json_schema":
            schema = fmt.get("schema")
            reject_if(not isinstance(schema, dict), "text.format.schema must be a JSON Schema object",
                       "text.format.schema", "invalid_value")
            name = fmt.get("name")
            return StructuredOutput("json_schema", json_schema=schema, schema_name=name if isinstance(name, str)
                                    else None, strict=fmt.get("strict") is True)
        raise invalid(f"text.format type {kind!r} is not supported (text, json_object, json_schema)",
                      "text.format", "unsupported_parameter")

    def to_structured(self) -> StructuredOutput | None:
        calls = tool_output(self.function_tools(), self.tool_choice, self.parallel_tool_calls)
        return with_answer_format(calls, self.text_format())


class ResponseObject(BaseModel):
    """A `response` object (the OpenAPI document's shape of it)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["response"]
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    pad: dict[str, Any] | None = None
