"""OpenAI Chat Completions request shape, plus PAD's two extensions
(`preference`, `pad`). Unknown fields are refused (400, naming them), and
known fields this server cannot honour are refused by the chat route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ContentPart(BaseModel):
    """Any typed part; non-text ones are refused by name in the route."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls etc. are refused by name in the route
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class WeightedPreference(Strict):
    text: str = Field(min_length=1)
    weight: float = 1.0


class PadOptions(Strict):
    weight: float | None = None
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    reward_model: str = "self"
    base_sees_preference: bool | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # Known OpenAI fields we cannot honour: accepted by the schema so the
    # route can refuse them by name (a clearer error than "unrecognized").
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    # PAD extensions (from the openai SDK: extra_body={...}).
    preference: str | list[str | WeightedPreference] | None = None
    pad: PadOptions | None = None
