"""OpenAI Chat Completions request shape, plus PAD's two extensions
(`preference`, `pad`); the bodies of the preference-memory and feedback
routes; and the response shapes the OpenAPI document states. Unknown fields
are refused (400, naming them), and known fields this server cannot honour
are refused by the chat route.

The bounds here come from pad_core.validation, the ones the request types
check (`verify`) in the gateway, the engine and the store: they are here so
the OpenAPI document states them, and a bad value is refused early."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from pad_core.validation import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_CHOICES,
    MAX_PENALTY,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MAX_WEIGHT,
)

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Weight = Annotated[float, Field(strict=True, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ContentPart(BaseModel):
    """Any typed part; non-text ones are refused by name in the route."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # tool_calls etc. are refused by name in the route
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class WeightedPreference(Strict):
    text: str = Field(min_length=1)
    weight: Weight = 1.0


class PadOptions(Strict):
    weight: float | None = Field(None, ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    top_k: int | None = Field(None, ge=1, le=INT64_MAX, description="at most the server's max_top_k (100)")
    min_p: float | None = Field(None, ge=0, le=1)
    reward_model: str = "self"
    base_sees_preference: bool | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Int64 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
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


# ---- preference memory and feedback (server/routes/users.py, feedback.py) --
PreferenceItem = StrictStr | WeightedPreference


class PutPreferences(Strict):
    preferences: list[PreferenceItem]


class PatchPreferences(Strict):
    add: list[PreferenceItem] | None = None
    remove: list[StrictStr] | None = None


ChoiceIndex = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]


class FeedbackRequest(Strict):
    completion_id: StrictStr = Field(min_length=1, max_length=128)
    choice_index: ChoiceIndex = 0
    rating: StrictStr | StrictInt | None = Field(None, description='"up", "down" (thumbs) or 1..5 (stars)')
    preferred_over: StrictStr | None = Field(None, min_length=1, max_length=128)
    preferred_over_choice_index: ChoiceIndex = 0
    comment: StrictStr | None = None


# ---- responses (the OpenAPI document) --------------------------------------
class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error of every route: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorBody


class ResponseMessage(Open):
    role: Literal["assistant"]
    content: str | None


class CompletionChoice(Open):
    index: int
    message: ResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    pad: dict[str, Any] | None = None


class StoredPreference(BaseModel):
    text: str
    weight: float


class PreferenceProfile(BaseModel):
    object: Literal["user.preferences"]
    user: str
    preferences: list[StoredPreference]
    created_at: int
    updated_at: int


class DeletedProfile(BaseModel):
    object: Literal["user.preferences.deleted"]
    user: str
    deleted: bool


class FeedbackRecord(Open):
    id: str
    object: Literal["feedback"]
    completion_id: str
    choice_index: int


class ModelCard(Open):
    id: str
    object: Literal["model"]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class RewardModelLoaded(BaseModel):
    object: Literal["reward_model"]
    id: str
    reward_models: list[str]
