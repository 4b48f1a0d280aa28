"""The OpenAI request shapes this server accepts (Chat Completions, legacy
Completions; the Responses API is in responses_models.py), plus PAD's two
extensions (`preference`, `pad`); the bodies of the preference-memory and
feedback routes; and the response shapes the OpenAPI document states.

Every documented OpenAI field is accepted: honoured, or accepted and
ignored where it has no effect here (`IGNORED`, each with the reason the
README's table gives); a value this server cannot honour (an audio answer,
web search, image parts) is refused by name. A field no API documents is a 400 naming it. The request models
build the engine's parameters themselves (`to_sampling_params`,
`to_guidance_params`, `to_structured`), as vLLM's protocol.py does.

The bounds here come from pad_core.validation, the ones the request types
check (`verify`) in the gateway, the engine and the store: they are here so
the OpenAPI document states them, and a bad value is refused early. Request
models are strict (a string is not a number, 1 is not true), as their JSON
Schema says."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from pad_core.types import GuidanceParams, SamplingParams, StructuredOutput, TemplateOptions, ToolFunction
from pad_core.validation import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_DOCUMENTS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_VALUE,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MAX_WEIGHT,
)
from server.errors import invalid

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Weight = Annotated[float, Field(strict=True, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
# OpenAI's metadata: kept with a stored chat completion, a conversation, a response.
# No NUL: PostgreSQL text cannot hold one (the stored completions' pairs are columns of their own).
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=64, pattern=r"^[^\x00]*$")],
         Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\x00]*$")]],
    Field(max_length=16, description="up to 16 pairs: keys up to 64 characters, values up to 512 (no NUL)"),
]

# Accepted and ignored: they change nothing here (no server-side storage, no
# tiers, a prompt cache that needs no key, no reasoning, one verbosity).
IGNORED: dict[str, str] = {
    "service_tier": "one tier; answers say service_tier 'default'",
    "prompt_cache_key": "the prefix cache is automatic: every prompt is looked up, no key needed",
    "prompt_cache_retention": "the prefix cache is automatic: every prompt is looked up, no key needed",
    "prompt_cache_options": "the prefix cache is automatic: every prompt is looked up, no key needed",
    "safety_identifier": "no abuse monitoring here (`user` keys the preference memory)",
    "verbosity": "the model has one verbosity; a preference steers length",
    "reasoning_effort": "the model does not reason before answering",
    "prediction": "predicted outputs only save latency",
    "stream_options.include_obfuscation": "no obfuscation padding is sent",
    "include_reasoning": "the model does not reason before answering: there is no reasoning to include",
    "length_penalty": "vLLM's, for beam search only (which is refused here)",
    "spaces_between_special_tokens": "the fast tokenizer writes special tokens' text without spaces between them "
                                     "(vLLM's fast detokenizer ignores it too)",
    "mm_processor_kwargs": "no images or audio here (their parts are refused)",
    "media_io_kwargs": "no images or audio here (their parts are refused)",
}


def reject_if(condition: bool, message: str, param: str, code: str = "unsupported_parameter") -> None:
    if condition:
        raise invalid(message, param, code)


class Strict(BaseModel):
    """A part of a request body: unknown fields refused, no type coercion
    (`0` is no boolean, `"4"` no number: the schema's types, as OpenAI
    checks them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StrictRequest(Strict):
    """A request body: unknown fields refused, and no type coercion. OpenAI's
    optional fields may be sent as null, which means their default
    (`NULL_IS_DEFAULT`: listed per model, the schema says they are nullable)."""

    @field_validator("*", mode="after")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name in NULL_IS_DEFAULT:
            return cls.model_fields[info.field_name].default
        return value


# Nullable in OpenAI's API, with a non-null default here.
NULL_IS_DEFAULT = frozenset({"n", "stream", "logprobs", "echo", "include_usage", "continuous_usage_stats"})


class ContentPart(BaseModel):
    """Any typed part; non-text ones are refused by name (server/messages.py)."""

    model_config = ConfigDict(extra="allow")
    type: str


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str
    parsed_arguments: Any = Field(None, description="ignored: the openai SDK's parse() helpers set it, and their "
                                  "documented loops send the message back")


class MessageToolCall(BaseModel):
    """An assistant message's earlier call (`messages[i].tool_calls[j]`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: str = "function"
    function: ToolCallFunction
    index: int | None = Field(None, description="ignored: a streamed call's position, kept by SDK accumulators")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    function_call: ToolCallFunction | None = None  # assistant (deprecated functions API)
    refusal: str | None = None  # assistant
    audio: dict[str, Any] | None = None  # assistant: an earlier audio answer (refused: no audio here)
    # An earlier answer sent back as the client library holds it (the openai
    # SDK's `messages.append(completion.choices[0].message)`, LiteLLM's
    # message objects): what the libraries add to the message is accepted and
    # ignored (a reasoning model's thoughts are not history, as in vLLM).
    annotations: list[Any] | None = None
    parsed: Any = None
    reasoning_content: str | None = None
    reasoning: Any = None
    thinking_blocks: list[Any] | None = None
    reasoning_items: list[Any] | None = None
    provider_specific_fields: dict[str, Any] | None = None
    images: list[Any] | None = None


class WeightedPreference(Strict):
    text: str = Field(min_length=1)
    weight: Weight = 1.0


class PadOptions(Strict):
    weight: float | None = Field(None, ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    top_k: int | None = Field(None, ge=1, le=INT64_MAX, description="PAD's prescreen: candidates kept "
                              "(at most the server's PAD_MAX_TOP_K, 100 by default); not the sampling-level top_k")
    min_p: float | None = Field(None, ge=0, le=1, description="PAD's prescreen floor: a candidate stays if "
                                "p_base >= min_p * max p_base; not the sampling-level min_p")
    reward_model: str = "self"
    base_sees_preference: bool | None = None

    def to_guidance_params(self) -> GuidanceParams:
        return GuidanceParams(weight=self.weight, top_k=self.top_k, min_p=self.min_p,
                              reward_model=self.reward_model, base_sees_preference=self.base_sees_preference)


def _not_a_single_object(value: Any) -> Any:
    """A lone {"text", "weight"} object is a common slip for a list of one;
    without this, pydantic's message would say it "should be a valid string"."""
    if isinstance(value, dict):
        raise ValueError('a single {"text", "weight"} object must be wrapped in a list: '
                         '"preference": [{"text": ..., "weight": ...}]; or send a string')
    return value


Preferences = Annotated[str | list[str | WeightedPreference] | None, BeforeValidator(_not_a_single_object)]


class StreamOptions(StrictRequest):
    include_usage: bool | None = False
    include_obfuscation: bool | None = Field(None, description="accepted and ignored")
    continuous_usage_stats: bool | None = Field(False, description="vLLM: usage (so far) on every chunk, "
                                                "with include_usage")


def guidance_of(pad: PadOptions | None) -> GuidanceParams:
    return pad.to_guidance_params() if pad is not None else GuidanceParams()


class SamplingFields(StrictRequest):
    """The fields Chat Completions and legacy Completions share: OpenAI's
    sampling settings, vLLM's extensions, and PAD's."""

    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=0, le=1, description="0 keeps only the most likely token (OpenAI accepts 0)")
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Int64 | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS_VALUE, le=MAX_LOGIT_BIAS_VALUE)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = Field(
        None, description="token id (as a string) -> bias added to its logit, -100..100")
    # vLLM's sampling extensions (on the base row's distribution; PAD's score sees them as it sees penalties)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX, description="vLLM: sample among the top_k tokens "
                              "(-1 or 0: all); not PAD's prescreen pad.top_k")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM: drop tokens below min_p x the top "
                                "token's probability; not PAD's prescreen pad.min_p")
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                             description="vLLM: > 1 discourages tokens already in the prompt or answer")
    ignore_eos: bool | None = Field(None, description="vLLM: keep going past end-of-sequence (up to max_tokens)")
    min_tokens: int | None = Field(None, ge=0, le=INT64_MAX, description="vLLM: no end-of-sequence before this many tokens")
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = Field(
        None, max_length=MAX_STOP_STRINGS, description="vLLM: token ids that end the answer")
    priority: Int64 = Field(0, description="vLLM: with PAD_SCHEDULING_POLICY=priority, waiting requests are "
                            "admitted lowest value first; otherwise it must be 0")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM: a matched stop string stays in the "
                                                    "answer")
    skip_special_tokens: bool | None = Field(None, description="vLLM: leave special tokens' text out (default "
                                             "true)")
    bad_words: Annotated[list[Annotated[str, Field(max_length=MAX_BAD_WORD_CHARS)]],
                         Field(max_length=MAX_BAD_WORDS)] | None = Field(
        None, description="vLLM: words the answer never writes (alone or after a space)")
    allowed_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]],
                                 Field(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)] | None = Field(
        None, description="vLLM: the only token ids the answer may use")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX, description="vLLM: keep only this many "
                                               "prompt tokens (-1: as many as fit); a preference's reward prompt "
                                               "keeps its preference")
    truncation_side: Literal["left", "right"] | None = Field(None, description="vLLM: with truncate_prompt_tokens, "
                                                             "drop the prompt's first tokens (left, the default) "
                                                             "or its last (right); alone, nothing")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="vLLM: the prompt's tokens' "
                                        "logprobs, with this many most likely tokens each (not with stream)")
    return_token_ids: bool | None = Field(None, description="vLLM: the prompt's and the answer's token ids "
                                          "(prompt_token_ids, token_ids; streamed: the prompt's on the first "
                                          "chunk, each chunk's own)")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM: logprobs name tokens as "
                                                    "'token_id:{id}' (bytes stay the token's own)")
    request_id: str | None = Field(None, min_length=1, max_length=128, description="vLLM: the request's id in "
                                   "the logs and the x-request-id header (an X-Request-Id header wins); the "
                                   "answer's own id stays unique")
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description="vLLM: only requests with the "
                                   "same salt share prefix-cache entries")
    use_beam_search: bool | None = Field(None, description="vLLM: refused if true (no beam search here)")
    length_penalty: float | None = Field(None, description="vLLM, beam search only: accepted and ignored")
    spaces_between_special_tokens: bool | None = Field(None, description="vLLM: accepted and ignored")
    logits_processors: list[Any] | None = Field(None, description="vLLM: refused unless null or empty (no custom "
                                                "code is loaded)")
    vllm_xargs: dict[str, Any] | None = Field(None, description="vLLM: refused unless null or empty (no custom "
                                              "logits processors to read them)")
    kv_transfer_params: dict[str, Any] | None = Field(None, description="vLLM: refused unless null (no "
                                                      "disaggregated prefill)")
    # Structured outputs: OpenAI's response_format, and vLLM's (structured_outputs, or its older guided_* fields)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="vLLM: exactly one of json, regex, choice, grammar (Lark or GBNF), json_object")
    guided_json: str | dict[str, Any] | None = Field(None, description="vLLM (older): a JSON Schema")
    guided_regex: str | None = Field(None, description="vLLM (older): a regex the answer matches")
    guided_choice: list[str] | None = Field(None, description="vLLM (older): the answer is one of these")
    guided_grammar: str | None = Field(None, description="vLLM (older): a Lark or GBNF grammar")
    guided_decoding_backend: str | None = Field(None, description="accepted and ignored: one grammar engine "
                                                "here (llguidance)")
    guided_whitespace_pattern: str | None = Field(None, description="vLLM (older): with guided_json, a regex "
                                                  "of the whitespace allowed between JSON's tokens")
    # PAD extensions (from the openai SDK: extra_body={...}).
    preference: Preferences = None
    pad: PadOptions | None = None

    def max_tokens_asked(self) -> int | None:
        raise NotImplementedError

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            reject_if(not key.isdigit() or len(key) > 19, f"logit_bias: {key!r} is not a token id",
                       "logit_bias", "invalid_value")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)

    def sampling_kwargs(self, choice: int, defaults: Mapping[str, float | int]) -> dict[str, Any]:
        """SamplingParams fields common to both endpoints; a field left out
        takes the model's default (`defaults`, from its generation config)
        or OpenAI's."""
        default = DefaultsOf(defaults)
        return {
            "max_tokens": self.max_tokens_asked(),  # None: the engine's default (the model's max_new_tokens, room)
            "temperature": default.of("temperature", self.temperature, 1.0),
            "top_p": default.of("top_p", self.top_p, 1.0),
            "seed": None if self.seed is None else choice_seed(self.seed, choice),
            "stop": self.stop_strings(),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": bool(self.ignore_eos),
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "top_k": max(0, default.of("top_k", self.top_k, 0)),  # -1 or 0: all
            "min_p": default.of("min_p", self.min_p, 0.0),
            "repetition_penalty": default.of("repetition_penalty", self.repetition_penalty, 1.0),
            "min_tokens": self.min_tokens or 0,
            "logit_bias": self.logit_bias_pairs(),
            "include_stop_str_in_output": bool(self.include_stop_str_in_output),
            "skip_special_tokens": self.skip_special_tokens is not False,
            "bad_words": tuple(self.bad_words or ()),
            "allowed_token_ids": tuple(self.allowed_token_ids or ()),
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "truncation_side": self.truncation_side or "left",
            "return_token_ids": bool(self.return_token_ids),
            "cache_salt": self.cache_salt,
        }

    def check_vllm_fields(self) -> None:
        """vLLM's own refusals of its token-level fields, and its fields this
        server cannot honour, refused by name."""
        reject_if(bool(self.use_beam_search), "use_beam_search is not supported: no beam search here (n samples "
                  "independent answers)", "use_beam_search")
        reject_if(bool(self.logits_processors), "logits_processors are not supported: no custom code is loaded",
                  "logits_processors")
        reject_if(bool(self.vllm_xargs), "vllm_xargs are not supported: no custom logits processors read them",
                  "vllm_xargs")
        reject_if(self.kv_transfer_params is not None, "kv_transfer_params are not supported: no disaggregated "
                  "prefill here", "kv_transfer_params")
        reject_if(self.truncate_prompt_tokens == 0, "truncate_prompt_tokens must be at least 1 (or -1: as many "
                  "as fit)", "truncate_prompt_tokens", "invalid_value")
        reject_if(self.prompt_logprobs is not None and bool(self.stream),
                  "prompt_logprobs are not available when stream is true (as in vLLM)", "prompt_logprobs",
                  "invalid_value")
        reject_if(any(not word.strip() for word in self.bad_words or ()),
                  "bad_words: a word must have a non-space character", "bad_words", "invalid_value")

    def to_guidance_params(self) -> GuidanceParams:
        return guidance_of(self.pad)

    def vllm_constraint(self) -> StructuredOutput | None:
        """vLLM's structured outputs (`structured_outputs` or the guided_*
        fields): at most one constraint, and not beside a response_format.
        A guided_* field that repeats structured_outputs' own constraint is
        no second one (guidance's vLLM client sends both, for either vLLM)."""
        outputs = self.structured_outputs
        given = [name for name in GUIDED_FIELDS if (value := getattr(self, name)) is not None
                 and not (outputs is not None and outputs.repeats(name, value))]
        if outputs is not None:
            given.append("structured_outputs")
        reject_if(len(given) > 1, f"give one structured outputs constraint, not {' and '.join(given)}", given[-1]
                  if given else "", "invalid_value")
        if outputs is not None:
            constraint = outputs.to_structured()
        elif given:
            constraint = vllm_output(given[0].removeprefix("guided_"), getattr(self, given[0]), given[0])
        else:
            constraint = None
        if self.guided_whitespace_pattern is not None:
            reject_if(constraint is None or constraint.kind not in ("json_schema", "json_object"),
                      "guided_whitespace_pattern applies to a JSON constraint (guided_json)",
                      "guided_whitespace_pattern", "invalid_value")
            reject_if(constraint.whitespace_pattern not in (None, self.guided_whitespace_pattern),
                      "give guided_whitespace_pattern or structured_outputs.whitespace_pattern, not both",
                      "guided_whitespace_pattern", "invalid_value")
            constraint = dataclasses.replace(constraint, whitespace_pattern=self.guided_whitespace_pattern)
        if constraint is None:
            return None
        reject_if(self.response_format is not None and self.response_format.type != "text",
                  f"give response_format or {given[0]}, not both", given[0], "invalid_value")
        return constraint

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk: vLLM's continuous_usage_stats, which counts only with include_usage (as there)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def check_stream_options(self) -> None:
        reject_if(self.stream_options is not None and not self.stream,
                   "stream_options is only allowed when stream is true", "stream_options", "invalid_value")
        self.check_vllm_fields()


@dataclass(frozen=True)
class DefaultsOf:
    """A request's sampling fields, each its own value when given, else the
    model's default (its generation config, pad_core/generation_defaults.py),
    else OpenAI's. (max_tokens left out is the engine's to size: the model's
    max_new_tokens within the room the prompt leaves.)"""

    defaults: Mapping[str, float | int]

    def of(self, name: str, given: Any, fallback: Any) -> Any:
        if given is not None:
            return given
        return self.defaults.get(name, fallback)


def choice_seed(seed: int, choice: int) -> int:
    """seed + choice, wrapped around within int64 (seed 2**63 - 1, choice 1
    must not overflow the IPC)."""
    return (seed + choice - INT64_MIN) % 2**64 + INT64_MIN


# ---- structured outputs and tools ------------------------------------------
class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_tool(self) -> ToolFunction:
        return ToolFunction(self.name, self.description, self.parameters, bool(self.strict))


class ToolDefinition(BaseModel):
    """`tools[i]`: function tools are honoured; other types are refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: str
    function: FunctionDefinition | None = None
    custom: dict[str, Any] | None = None


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(StrictRequest):
    type: Literal["text"]


class ResponseFormatJSONObject(StrictRequest):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(StrictRequest):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                           Field(discriminator="type")]


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def json_schema_value(value: str | dict[str, Any], param: str) -> dict[str, Any]:
    """vLLM's `json`: a JSON Schema object, or its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python parses
            raise invalid(f"{param} is not valid JSON: {exc}", param, "invalid_value") from None
    reject_if(not isinstance(value, dict), f"{param} must be a JSON Schema object", param, "invalid_value")
    return value


def vllm_output(kind: str, value: Any, source: str, whitespace_pattern: str | None = None) -> StructuredOutput:
    """One vLLM constraint (`kind`: json, regex, choice, grammar or
    json_object; from `structured_outputs` or an older guided_* field, named
    by `source`) -> the engine's StructuredOutput."""
    if kind == "json":
        return StructuredOutput("json_schema", json_schema=json_schema_value(value, source), source=source,
                                whitespace_pattern=whitespace_pattern)
    if kind == "regex":
        return StructuredOutput("regex", regex=value, source=source)
    if kind == "choice":
        return StructuredOutput("choice", choices=tuple(value), source=source)
    if kind == "grammar":
        return StructuredOutput("grammar", grammar=value, source=source)
    return StructuredOutput("json_object", source=source, whitespace_pattern=whitespace_pattern)


class StructuredOutputsParams(StrictRequest):
    """vLLM's `structured_outputs` (its StructuredOutputsParams): exactly one
    constraint. JSON comes out compact (`disable_any_whitespace` is how it
    always is here); the grammar engine is llguidance whatever is asked."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = Field(None, description="refused unless null: no structural tags here")
    whitespace_pattern: str | None = Field(None, description="with json or json_object: a regex of the whitespace "
                                           "allowed between JSON's tokens (default: json.dumps style)")
    disable_any_whitespace: bool | None = Field(None, description="accepted: JSON has no free whitespace here anyway")
    disable_additional_properties: bool | None = Field(
        None, description="accepted and ignored: an object that lists its keys allows only those unless it says so")
    disable_fallback: bool | None = Field(None, description="accepted and ignored: one grammar engine here")

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, populate_by_name=True)

    def to_structured(self) -> StructuredOutput:
        param = "structured_outputs"
        reject_if(self.structural_tag is not None, "structured_outputs.structural_tag is not supported",
                  f"{param}.structural_tag")
        values = {"json": self.json_, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                  "json_object": self.json_object or None}
        given = [name for name, value in values.items() if value is not None]
        reject_if(not given, "structured_outputs needs one of json, regex, choice, grammar or json_object", param,
                  "missing_required_parameter")
        reject_if(len(given) > 1, f"structured_outputs takes one constraint, not {' and '.join(given)}",
                  f"{param}.{given[-1]}", "invalid_value")
        source = f"{param}.{given[0]}"
        reject_if(self.whitespace_pattern is not None and given[0] not in ("json", "json_object"),
                  "structured_outputs.whitespace_pattern applies to json and json_object",
                  f"{param}.whitespace_pattern", "invalid_value")
        return vllm_output(given[0], values[given[0]], source, self.whitespace_pattern)

    def repeats(self, guided: str, value: Any) -> bool:
        """Whether one of the older guided_* fields holds this constraint again."""
        mine = {"guided_json": self.json_, "guided_regex": self.regex, "guided_choice": self.choice,
                "guided_grammar": self.grammar}[guided]
        if guided == "guided_json" and isinstance(mine, str) != isinstance(value, str):
            # the same schema, as an object in one field and as JSON text in the other
            text, schema = (mine, value) if isinstance(mine, str) else (value, mine)
            try:
                return json.loads(text) == schema
            except (ValueError, RecursionError):
                return False
        return mine == value


def response_format_output(fmt: ResponseFormat | None) -> StructuredOutput | None:
    """OpenAI `response_format` -> the engine's StructuredOutput (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    spec = fmt.json_schema
    return StructuredOutput("json_schema", json_schema=spec.schema_ if spec.schema_ is not None else {"type": "object"},
                            schema_name=spec.name, strict=bool(spec.strict))


def with_answer_format(calls: StructuredOutput | None, answer: StructuredOutput | None) -> StructuredOutput | None:
    """Tools and a response format together. Forced calls win (the answer
    is calls, the format has nothing to shape); with tool_choice "auto" an
    answer that is not calls follows the format (openai-agents sends both
    for an agent with tools and an `output_type`)."""
    if calls is None or answer is None or not calls.auto:
        return calls or answer
    schema = answer.json_schema if answer.kind == "json_schema" else {"type": "object"}
    return dataclasses.replace(calls, json_schema=schema, schema_name=answer.schema_name,
                               strict=calls.strict or answer.strict)


def function_tools(tools: list[ToolDefinition] | None, param: str = "tools") -> list[ToolFunction]:
    out = []
    for index, tool in enumerate(tools or ()):
        reject_if(tool.type != "function" or tool.function is None,
                   f"{param}[{index}]: only function tools are supported (type 'function' with a 'function'), "
                   f"not {tool.type!r}", f"{param}[{index}].type")
        out.append(tool.function.to_tool())
    return out


def allowed_tool_name(tool: Any) -> str | None:
    """The name of one `tool_choice.tools` entry ({"type": "function",
    "function": {"name"}} in Chat Completions, {"type": "function", "name"}
    in Responses); None for anything else."""
    if not isinstance(tool, dict):
        return None
    function = tool.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    name = name if name is not None else tool.get("name")
    return name if isinstance(name, str) else None


def tool_output(tools: list[ToolFunction], tool_choice: Any, parallel: bool | None,
                choice_param: str = "tool_choice") -> StructuredOutput | None:
    """tools + tool_choice -> a tool-call grammar, or None (free text: no
    tools, or tool_choice 'none'). 'required' or a named function forces
    calls; 'auto' (the default with tools) lets the model answer with calls
    or with text, its choice made at the answer's first character."""
    name = None
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind == "function":
            function = tool_choice.get("function") or {}
            name = function.get("name") if isinstance(function, dict) else None
            name = name if name is not None else tool_choice.get("name")  # the Responses API's shape
            reject_if(not isinstance(name, str), "tool_choice: a named function needs function.name",
                       choice_param, "invalid_value")
        elif kind == "allowed_tools":
            # Chat Completions nests mode and tools under "allowed_tools"; Responses has them beside "type".
            nested = tool_choice.get("allowed_tools")
            tool_choice = nested if isinstance(nested, dict) else tool_choice
            mode = tool_choice.get("mode", "auto")
            reject_if(mode not in ("auto", "required"), "tool_choice.mode must be 'auto' or 'required'",
                       choice_param, "invalid_value")
            listed = tool_choice.get("tools") or []
            reject_if(not isinstance(listed, list), "tool_choice.tools must be a list of tools", choice_param,
                       "invalid_value")
            allowed = {allowed_tool_name(t) for t in listed}
            tools = [t for t in tools if t.name in allowed]
            reject_if(not tools, "tool_choice.tools names none of the tools", choice_param, "invalid_value")
            tool_choice = mode
        else:
            raise invalid(f"tool_choice type {kind!r} is not supported (function or allowed_tools)", choice_param,
                          "unsupported_parameter")
    elif tool_choice not in (None, "none", "auto", "required"):
        raise invalid(f"tool_choice {tool_choice!r} is not one of none, auto, required or a named function",
                      choice_param, "invalid_value")
    if not tools:
        reject_if(tool_choice == "required" or name is not None, "tool_choice requires tools", choice_param,
                   "invalid_value")
        return None
    if tool_choice == "none":
        return None
    return StructuredOutput("tool_calls", tools=tuple(tools), tool_choice=name,
                            parallel_tool_calls=parallel is not False,
                            auto=name is None and tool_choice != "required")


# ---- POST /v1/chat/completions ---------------------------------------------
class ChatCompletionRequest(SamplingFields):
    model: str | None = Field(None, description="the served model's name; vLLM lets it be left out (the served "
                              "model), as here")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, description="deprecated: use tools")
    function_call: Literal["none", "auto"] | dict[str, Any] | None = Field(None, description="deprecated: use tool_choice")
    # vLLM's chat-template fields, and its echo
    echo: bool = Field(False, description="vLLM: the answer opens with the last message when it is the "
                       "assistant's (with continue_final_message: the whole message)")
    add_generation_prompt: bool = Field(True, description="vLLM: open the assistant's turn after the messages")
    continue_final_message: bool = Field(False, description="vLLM: the answer continues the last message (a "
                                         "prefilled answer; needs add_generation_prompt false)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM: more variables for the chat "
                                                         "template (enable_thinking, say)")
    documents: Annotated[list[dict[str, str]], Field(max_length=MAX_DOCUMENTS)] | None = Field(
        None, description="vLLM: passages for a chat template that renders documents (each an object of strings)")
    add_special_tokens: bool = Field(False, description="vLLM: let the tokenizer add its special tokens (a BOS) "
                                     "to the rendered chat; the template writes its own")
    chat_template: str | None = Field(None, description="vLLM: refused unless null (the server's chat template "
                                      "is used, as vLLM without --trust-request-chat-template)")
    include_reasoning: bool | None = Field(None, description="vLLM: accepted and ignored (no reasoning model)")
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="vLLM: accepted and ignored (no media)")
    media_io_kwargs: dict[str, Any] | None = Field(None, description="vLLM: accepted and ignored (no media)")
    # Honoured when they ask for nothing this server lacks: refused by name otherwise.
    audio: dict[str, Any] | None = Field(None, description="refused unless null: no audio here")
    modalities: list[str] | None = Field(None, description="['text'] only")
    web_search_options: dict[str, Any] | None = Field(None, description="refused unless null: no web search here")
    moderation: dict[str, Any] | None = Field(None, description="refused unless null: no moderation here")
    store: bool | None = Field(None, description="true: kept as a stored chat completion (GET "
                               "/v1/chat/completions/{id}) for PAD_CHAT_COMPLETIONS_RETENTION_DAYS")
    metadata: Metadata | None = Field(None, description="kept with a stored chat completion (store: true), "
                                      "to filter the list by")
    # Accepted and ignored (IGNORED says why).
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: str | None = None
    prediction: dict[str, Any] | None = None

    def max_tokens_asked(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def refuse_unsupported(self) -> None:
        """Values this server cannot honour, refused by name (never ignored)."""
        reject_if(self.audio is not None, "'audio' is not supported: this server answers text only", "audio")
        reject_if(any(m != "text" for m in self.modalities or ()), "modalities: only 'text' is supported",
                   "modalities")
        reject_if(self.web_search_options is not None, "'web_search_options' is not supported: no web search here",
                   "web_search_options")
        reject_if(self.moderation is not None, "'moderation' is not supported: no moderation here", "moderation")
        reject_if(bool(self.top_logprobs) and not self.logprobs, "top_logprobs requires logprobs: true",
                   "top_logprobs", "invalid_value")
        reject_if(bool(self.tools) and bool(self.functions), "give tools or functions, not both", "functions",
                   "invalid_value")
        reject_if(self.chat_template is not None, "chat_template: a request's own chat template is not accepted "
                  "(the server's is used; vLLM refuses it too unless started with --trust-request-chat-template)",
                  "chat_template")
        self.check_stream_options()

    def to_sampling_params(self, choice: int = 0, defaults: Mapping[str, float | int] = MappingProxyType({})
                           ) -> SamplingParams:
        return SamplingParams(**self.sampling_kwargs(choice, defaults), logprobs=self.logprobs,
                              top_logprobs=self.top_logprobs or 0, prompt_logprobs=self.prompt_logprobs)

    def to_template(self) -> TemplateOptions:
        return TemplateOptions(self.add_generation_prompt, self.continue_final_message,
                               dict(self.chat_template_kwargs or {}),
                               None if self.documents is None else [dict(d) for d in self.documents],
                               self.add_special_tokens)

    @property
    def legacy_functions(self) -> bool:
        """The deprecated functions API: a forced call answers `function_call`."""
        return bool(self.functions)

    def to_structured(self) -> StructuredOutput | None:
        """tools / tool_choice (or the deprecated functions / function_call)
        and response_format -> the grammar the answer must follow
        (`with_answer_format`: forced calls, or calls or the format)."""
        if self.functions:
            tools = [f.to_tool() for f in self.functions]
            choice = self.function_call
            if isinstance(choice, dict):
                choice = {"type": "function", "function": choice}
            forced = tool_output(tools, choice, False, "function_call")
        else:
            forced = tool_output(function_tools(self.tools), self.tool_choice, self.parallel_tool_calls)
        constraint = self.vllm_constraint()
        if constraint is not None:
            reject_if(forced is not None, f"give tools or {constraint.source.split('.')[0]}, not both "
                      "(tool_choice 'none' leaves the tools out)", constraint.source.split(".")[0], "invalid_value")
            return constraint
        return with_answer_format(forced, response_format_output(self.response_format))


# ---- POST /v1/completions (legacy) -----------------------------------------
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT64_MAX)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    model: str | None = Field(None, description="the served model's name; vLLM lets it be left out (the served "
                              "model), as here")
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX, description="OpenAI's default, 16; null: "
                                   "PAD_DEFAULT_MAX_TOKENS; 0 with echo: score the prompt only")
    logprobs: int | None = Field(None, ge=0, le=5, description="the most likely tokens per position (0-5); with "
                                 "echo, the prompt's tokens too (the first one's logprob is null)")
    echo: bool | None = False
    suffix: str | None = Field(None, description="refused unless null: no insertion here")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="at most n (no ranking of extra samples)")
    add_special_tokens: bool = Field(True, description="vLLM: let the tokenizer add its special tokens (a BOS) "
                                     "to a text prompt")
    prompt_embeds: Any = Field(None, description="vLLM: refused unless null (token prompts only)")

    def max_tokens_asked(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]
        return [p if isinstance(p, str) else list(p) for p in prompt]

    def refuse_unsupported(self) -> None:
        reject_if(self.suffix is not None, "'suffix' is not supported (no insertion)", "suffix")
        reject_if(self.prompt_embeds is not None, "prompt_embeds are not supported: give text or token ids",
                  "prompt_embeds")
        reject_if(self.best_of is not None and self.best_of > self.n,
                   "best_of larger than n is not supported (no ranking of extra samples)", "best_of")
        reject_if(self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None,
                   "max_tokens 0 generates nothing: it needs echo or prompt_logprobs (to score the prompt)",
                   "max_tokens")
        for index, prompt in enumerate(self.prompts()):
            reject_if(prompt == "", f"prompt[{index}] is empty" if not isinstance(self.prompt, str) else "prompt is empty",
                       "prompt", "invalid_value")
        self.check_stream_options()

    def to_sampling_params(self, choice: int = 0, defaults: Mapping[str, float | int] = MappingProxyType({})
                           ) -> SamplingParams:
        return SamplingParams(**self.sampling_kwargs(choice, defaults), logprobs=self.logprobs is not None,
                              top_logprobs=self.logprobs or 0, prompt_logprobs=self.prompt_logprobs_asked())

    def to_structured(self) -> StructuredOutput | None:
        """vLLM's structured outputs or a response_format (as vLLM takes it here too)."""
        return self.vllm_constraint() or response_format_output(self.response_format)

    def prompt_logprobs_asked(self) -> int | None:
        """echo with logprobs reports the prompt's tokens too; echo of token
        ids needs their text, which comes with them (the tokenizer is the
        worker's), and so does a request that only scores (max_tokens 0);
        otherwise none."""
        return max_or_none(self.prompt_logprobs, self.echo_logprobs())

    def echo_logprobs(self) -> int | None:
        """What an echo needs of the prompt's logprobs: with logprobs, the
        prompt's tokens open them; the text of token ids or of a truncated
        prompt (what the model read), and a request that only scores
        (max_tokens 0), need the entries."""
        if not self.echo:
            return None
        if self.logprobs is not None:
            return self.logprobs
        needs_text = self.truncate_prompt_tokens is not None or any(not isinstance(p, str) for p in self.prompts())
        return 0 if self.max_tokens == 0 or needs_text else None


def max_or_none(*counts: int | None) -> int | None:
    given = [count for count in counts if count is not None]
    return max(given) if given else None


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
    # Any JSON here: the store's own check names what a rating may be (4.5 is "not an integer from 1 to 5",
    # not pydantic's "should be a valid string").
    # The document says what is accepted: thumbs or 1..5 stars.
    rating: Annotated[StrictStr | StrictInt | float | None, WithJsonSchema({"anyOf": [
        {"type": "string", "enum": ["up", "down", "thumbs_up", "thumbs_down"]},
        {"type": "integer", "minimum": 1, "maximum": 5},
        {"type": "null"}]})] = Field(None, description='"up", "down" (thumbs) or 1..5 (stars)')
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
    tool_calls: list[dict[str, Any]] | None = None


class CompletionChoice(Open):
    index: int
    message: ResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class PromptTokensDetails(Open):
    cached_tokens: int = Field(description="prompt tokens read from the prefix cache")


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    pad: dict[str, Any] | None = None


class TextCompletionChoice(Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class TextCompletion(Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextCompletionChoice]
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
    # Anthropic's page fields (its SDK's client.models.list)
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class RewardModelLoaded(BaseModel):
    object: Literal["reward_model"]
    id: str
    reward_models: list[str]


class RewardModelCard(BaseModel):
    object: Literal["reward_model"]
    id: str
    type: Literal["self", "lora", "model"] = Field(
        description='"self": the base model reads the preference; "lora": an adapter on the base weights '
                    '(unloadable); "model": weights of its own, set at start')


class RewardModelList(BaseModel):
    object: Literal["list"]
    data: list[RewardModelCard]


class RewardModelDeleted(BaseModel):
    object: Literal["reward_model.deleted"]
    id: str
    deleted: Literal[True]
    in_use: int = Field(description="requests still running with it: its memory is freed when they end")
    reward_models: list[str]
