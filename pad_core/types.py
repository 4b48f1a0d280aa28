"""Plain data exchanged with the engine. All of it is JSON/msgpack friendly
(`to_dict` / `from_dict`) so it can cross the gateway <-> worker IPC."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Literal

from pad_core.errors import InvalidRequestError
from pad_core.validation import (
    INT64_MAX,
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_CACHE_SALT_CHARS,
    MAX_DOCUMENTS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_VALUE,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MAX_WEIGHT,
    check_bool,
    check_float,
    check_int,
    check_json,
    check_text,
)

FinishReason = Literal["stop", "length", "abort", "error"]
StructuredKind = Literal["json_object", "json_schema", "tool_calls", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Preference:
    """One user preference, e.g. "short answers with a bit of humour"."""

    text: str
    weight: float = 1.0

    def verify(self, param: str = "preference", max_chars: int | None = None) -> None:
        """Text: a non-blank, valid Unicode string of at most max_chars; weight:
        finite, |weight| <= MAX_WEIGHT. `param` names this preference."""
        if not isinstance(self.text, str):
            raise InvalidRequestError(f"{param}.text must be a string", param=f"{param}.text")
        check_text(self.text, param, max_chars=max_chars, code="preference_too_long")
        if not self.text.strip():
            raise InvalidRequestError(f"{param} is empty", param=param, code="empty_preference")
        check_float(self.weight, f"{param}.weight", -MAX_WEIGHT, MAX_WEIGHT)


@dataclass(frozen=True)
class RequestLimits:
    """The bounds a deployment sets (settings fields of the same names), on
    top of the fixed ones in pad_core.validation."""

    max_preferences: int = 8
    max_preference_chars: int = 2000
    max_top_k: int = 100

    @classmethod
    def from_settings(cls, settings: object) -> RequestLimits:
        values = {f.name: getattr(settings, f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})


def preference_key(text: str) -> str:
    """What makes two preference texts the same preference: case and runs
    of white space aside ("Short  answers" is "short answers")."""
    return " ".join(text.split()).casefold()


def distinct_preferences(preferences: Sequence[Preference]) -> list[Preference]:
    """The preferences without texts repeated case and spacing aside, the
    first of each kept: a profile stored before texts matched that way
    still runs (verify_preferences would refuse it) and can be edited."""
    seen: set[str] = set()
    out = []
    for preference in preferences:
        key = preference_key(preference.text)
        if key not in seen:
            seen.add(key)
            out.append(preference)
    return out


def verify_preferences(preferences: Sequence[Preference], limits: RequestLimits, param: str = "preference") -> None:
    """The one rule for a list of preferences, inline or stored: at most
    max_preferences, each valid (Preference.verify), no text twice (a stored
    profile is edited by text, and a repeated text is a doubled weight;
    texts that differ in case or spacing alone are the same, preference_key)."""
    if len(preferences) > limits.max_preferences:
        raise InvalidRequestError(
            f"too many preferences: {len(preferences)} given, at most {limits.max_preferences} allowed",
            param=param,
            code="too_many_preferences",
        )
    seen: set[str] = set()
    for index, preference in enumerate(preferences):
        where = f"{param}[{index}]"
        preference.verify(where, limits.max_preference_chars)
        key = preference_key(preference.text) if isinstance(preference.text, str) else preference.text
        if key in seen:
            raise InvalidRequestError(f"{where} repeats an earlier preference (case and spacing aside)", param=where,
                                      code="duplicate_preference")
        seen.add(key)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI names and meanings)."""

    max_tokens: int | None = None  # None: up to the model's context length
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20, only with logprobs
    # vLLM's sampling extensions. They act on the base row's logits, as the
    # penalties above do: on what plain decoding samples from, and on PAD's
    # prescreen and score (never on the reward, which compares the two
    # models' own distributions). Not PAD's prescreen `GuidanceParams.top_k`
    # / `min_p`: these filter the distribution a token is drawn from.
    top_k: int = 0  # keep the top_k most likely tokens; 0: all
    min_p: float = 0.0  # keep tokens with p >= min_p * max p; 0: all
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the answer (CTRL / vLLM); 1: off
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are impossible before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's logit_bias
    # Log-probabilities of the prompt's own tokens under the plain model, with
    # this many most likely alternatives each (vLLM's prompt_logprobs; the
    # legacy Completions' echo + logprobs); None: not asked. With max_tokens
    # 0 the request only scores its prompt.
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False  # vLLM: a matched stop string (or stop token's text) stays in the answer
    skip_special_tokens: bool = True  # vLLM: special tokens' text is left out of the answer
    # vLLM: words the answer never writes (their last token is banned where
    # the answer so far ends with the rest; GenerationRequest.bad_words_ids).
    bad_words: tuple[str, ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # vLLM: only these tokens may be chosen; empty: any
    # vLLM: keep only this many of the prompt's tokens (-1: as many as fit),
    # dropping from the start ("left", vLLM's default) or the end ("right").
    # Not sampling, but where vLLM carries it too.
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "left"
    # vLLM's return_token_ids: the first output carries the prompt's token
    # ids (StepOutput.prompt_token_ids). Not sampling either; the answer's
    # ids come with every output anyway.
    return_token_ids: bool = False
    # vLLM's cache_salt: the request shares prefix-cache entries only with
    # requests of the same salt (pad_core.runner.prefix_key). Not sampling.
    cache_salt: str | None = None

    @property
    def processes_logits(self) -> bool:
        """Whether any of the vLLM extensions or logit_bias is on."""
        return bool(self.top_k or self.min_p or self.repetition_penalty != 1.0 or self.min_tokens or self.logit_bias
                    or self.bad_words or self.allowed_token_ids)

    def verify(self) -> None:
        """Every field within its legal range (vLLM's _verify_args); raises
        InvalidRequestError naming the OpenAI parameter."""
        if self.prompt_logprobs is not None:
            check_int(self.prompt_logprobs, "prompt_logprobs", 0, MAX_TOP_LOGPROBS)
        if self.max_tokens is not None:  # 0: score the prompt only
            check_int(self.max_tokens, "max_tokens", 0 if self.prompt_logprobs is not None else 1, INT64_MAX)
        check_float(self.temperature, "temperature", 0.0, MAX_TEMPERATURE)
        check_float(self.top_p, "top_p", 0.0, 1.0)  # 0: the most likely token alone (top_p_filter keeps it)
        if self.seed is not None:
            check_int(self.seed, "seed")
        if not isinstance(self.stop, tuple | list) or len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop must be at most {MAX_STOP_STRINGS} strings", param="stop")
        for stop in self.stop:
            check_text(stop, "stop")
        if not isinstance(self.stop_token_ids, tuple | list):
            raise InvalidRequestError("stop_token_ids must be a list of token ids", param="stop_token_ids")
        for token in self.stop_token_ids:
            check_int(token, "stop_token_ids", 0)
        check_bool(self.ignore_eos, "ignore_eos")
        check_bool(self.include_stop_str_in_output, "include_stop_str_in_output")
        check_bool(self.skip_special_tokens, "skip_special_tokens")
        check_bool(self.return_token_ids, "return_token_ids")
        if self.cache_salt is not None:
            check_text(self.cache_salt, "cache_salt", max_chars=MAX_CACHE_SALT_CHARS)
            if not self.cache_salt:
                raise InvalidRequestError("cache_salt must not be empty", param="cache_salt")
        check_float(self.presence_penalty, "presence_penalty", -MAX_PENALTY, MAX_PENALTY)
        check_float(self.frequency_penalty, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY)
        check_bool(self.logprobs, "logprobs")
        check_int(self.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        check_int(self.top_k, "top_k", 0, INT64_MAX)
        check_float(self.min_p, "min_p", 0.0, 1.0)
        check_float(self.repetition_penalty, "repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        check_int(self.min_tokens, "min_tokens", 0, INT64_MAX)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens must be at most max_tokens", param="min_tokens")
        if not isinstance(self.logit_bias, tuple | list) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids", param="logit_bias")
        for entry in self.logit_bias:
            if not isinstance(entry, tuple | list) or len(entry) != 2:
                raise InvalidRequestError("logit_bias must map token ids to biases", param="logit_bias")
            check_int(entry[0], "logit_bias", 0, INT64_MAX)
            check_float(entry[1], "logit_bias", -MAX_LOGIT_BIAS_VALUE, MAX_LOGIT_BIAS_VALUE)
        if not isinstance(self.bad_words, tuple | list) or len(self.bad_words) > MAX_BAD_WORDS:
            raise InvalidRequestError(f"bad_words must be at most {MAX_BAD_WORDS} strings", param="bad_words")
        for word in self.bad_words:
            check_text(word, "bad_words", max_chars=MAX_BAD_WORD_CHARS)
            if not word.strip():
                raise InvalidRequestError("bad_words: a word must have a non-space character", param="bad_words")
        if not isinstance(self.allowed_token_ids, tuple | list) or len(self.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
            raise InvalidRequestError(f"allowed_token_ids must be at most {MAX_ALLOWED_TOKEN_IDS} token ids",
                                      param="allowed_token_ids")
        for token in self.allowed_token_ids:
            check_int(token, "allowed_token_ids", 0)
        if self.truncate_prompt_tokens is not None:
            check_int(self.truncate_prompt_tokens, "truncate_prompt_tokens", -1)
            if self.truncate_prompt_tokens == 0:
                raise InvalidRequestError("truncate_prompt_tokens must be at least 1 (or -1: as many as fit)",
                                          param="truncate_prompt_tokens")
        if self.truncation_side not in ("left", "right"):
            raise InvalidRequestError("truncation_side must be 'left' or 'right'", param="truncation_side")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplingParams:
        """From to_dict / msgpack, where tuples arrive as lists."""
        sampling = dict(data or {})
        for key in ("stop", "stop_token_ids", "bad_words", "allowed_token_ids"):
            if key in sampling:
                sampling[key] = tuple(sampling[key])
        if "logit_bias" in sampling:
            sampling["logit_bias"] = tuple(tuple(entry) for entry in sampling["logit_bias"])
        return cls(**sampling)


@dataclass(frozen=True)
class GuidanceParams:
    """PAD settings. None means: the engine's default."""

    weight: float | None = None  # w; 0 = plain decoding
    top_k: int | None = None  # candidates kept by the base model's prescreen
    min_p: float | None = None  # prescreen floor: keep a if p_base(a) >= min_p * max p_base
    reward_model: str = "self"
    base_sees_preference: bool | None = None  # None: False for self, True otherwise

    def verify(self, limits: RequestLimits) -> None:
        """Every field within its legal range (None: the engine's default)."""
        if self.weight is not None:
            check_float(self.weight, "pad.weight", -MAX_WEIGHT, MAX_WEIGHT)
        if self.top_k is not None:
            check_int(self.top_k, "pad.top_k", 1, limits.max_top_k)
        if self.min_p is not None:
            check_float(self.min_p, "pad.min_p", 0.0, 1.0)
        check_text(self.reward_model, "pad.reward_model")
        if self.base_sees_preference is not None:
            check_bool(self.base_sees_preference, "pad.base_sees_preference")

    def resolved(self, defaults: dict[str, Any], source_sees: bool | None) -> dict[str, Any]:
        """The settings a request runs with, as the `pad` echo names them: its
        own, else the engine's `defaults` ({"weight", "top_k", "min_p"}:
        EngineSettings.guidance_defaults), and whether the base context holds
        the preferences (else the reward source's `source_sees`; left out
        when neither is known, as for a request not yet admitted)."""
        out: dict[str, Any] = {
            "reward_model": self.reward_model,
            "weight": defaults["weight"] if self.weight is None else self.weight,
            "top_k": defaults["top_k"] if self.top_k is None else self.top_k,
            "min_p": defaults["min_p"] if self.min_p is None else self.min_p,
        }
        sees = source_sees if self.base_sees_preference is None else self.base_sees_preference
        if sees is not None:
            out["base_sees_preference"] = bool(sees)
        return out


@dataclass(frozen=True)
class ToolFunction:
    """A function the model may call (OpenAI `tools[].function`)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema of the arguments; None: any JSON object
    strict: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolFunction:
        return cls(**data)


# How a tool-call answer opens, after any LEADING_SPACE: its JSON array of
# calls, or (tool_choice "auto", free text) one call's object, as models
# trained on single JSON calls write it. With "auto", a text answer cannot
# open with either (StructuredOutput.call_openers).
CALLS_OPENERS = ("[", "{")
LEADING_SPACE = " \t\r\n"


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the answer must follow (torch-free; pad_core/structured.py
    compiles it). The grammar's token mask is applied to the base logits
    before PAD's prescreen, so the reward only chooses among legal tokens,
    and the request stops ("stop") as soon as the grammar is complete.

    kind:
    - "json_object": any JSON object (OpenAI `response_format: json_object`).
    - "json_schema": JSON matching `json_schema` (OpenAI `response_format:
      json_schema`; `strict` refuses schema keywords the grammar engine does
      not implement, non-strict ignores them).
    - "tool_calls": a JSON array of calls `[{"name": ..., "arguments":
      {...}}, ...]` of the functions in `tools` (OpenAI `tool_choice:
      "required"`); `tool_choice` names the one function to call (exactly one
      call); `parallel_tool_calls=False` allows one call only. The final
      StepOutput carries them parsed in `tool_calls`. With `auto` (OpenAI
      `tool_choice: "auto"`) the model chooses: the answer is either that
      array, or one call's object, or plain text (which cannot open with
      "[" or "{"), never both. With `auto` and a `json_schema` (a
      `response_format` given with the tools), the answer is the array of
      calls or JSON matching that schema.
    - "regex": text matching `regex` (Rust regex syntax, anchored at both
      ends; vLLM's `structured_outputs.regex` / `guided_regex`).
    - "choice": exactly one of `choices` (vLLM's `choice` / `guided_choice`).
    - "grammar": text of the context-free `grammar`, in Lark (llguidance's
      dialect) or llama.cpp's GBNF (vLLM's `grammar` / `guided_grammar`).

    JSON comes out in json.dumps style, unless `whitespace_pattern` (a
    regex) says what whitespace may stand between its tokens.

    `source` names the request field the constraint came from, when it is not
    the kind's usual one (an error then names the field the client sent).
    """

    kind: StructuredKind
    json_schema: dict[str, Any] | None = None
    schema_name: str | None = None  # OpenAI `json_schema.name`, informational
    strict: bool = False
    tools: tuple[ToolFunction, ...] = ()
    tool_choice: str | None = None
    parallel_tool_calls: bool = True
    auto: bool = False
    regex: str | None = None
    choices: tuple[str, ...] = ()
    grammar: str | None = None
    source: str | None = None
    whitespace_pattern: str | None = None  # JSON kinds: a regex of the whitespace allowed between tokens (vLLM's)

    @property
    def param(self) -> str:
        """The request field an error about this constraint names."""
        if self.source is not None:
            return self.source
        return "tools" if self.kind == "tool_calls" else "response_format"

    @property
    def call_openers(self) -> tuple[str, ...]:
        """tool_choice "auto": the first characters (after LEADING_SPACE) of
        an answer that is calls. Only the array where the other answer is
        JSON (a response_format), which opens with "{" itself."""
        return CALLS_OPENERS[:1] if self.json_schema is not None else CALLS_OPENERS

    @property
    def free_text(self) -> bool:
        """tool_choice "auto" whose other answer is free text."""
        return self.auto and self.json_schema is None

    def verify(self) -> None:
        """Plain JSON that crosses the IPC (pad_core.validation.check_json);
        the grammar engine checks the schemas themselves (structured.check_spec)."""
        check_json(self.json_schema, self.param)
        for index, tool in enumerate(self.tools):
            check_json([tool.name, tool.description], f"tools[{index}].function")
            check_json(tool.parameters, f"tools[{index}].function.parameters")
        check_json([self.schema_name, self.tool_choice, self.regex, self.grammar, self.source,
                    self.whitespace_pattern], self.param)
        check_json(list(self.choices), self.param)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOutput:
        tools = tuple(ToolFunction.from_dict(t) for t in data.get("tools") or ())
        return cls(**{**data, "tools": tools, "choices": tuple(data.get("choices") or ())})


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made; `arguments` is JSON text (as in
    OpenAI's `tool_calls[].function.arguments`)."""

    name: str
    arguments: str


# apply_chat_template's own arguments (and what the template is given by the
# renderer): a request's chat_template_kwargs cannot set them. Where the
# worker renders, the installed transformers' own signature is checked too
# (PromptBuilder.encode): an argument a later version adds is refused as well.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "sanitize_control_tokens",
})


@dataclass(frozen=True)
class TemplateOptions:
    """How a chat goes through the chat template (vLLM's chat fields):
    `add_generation_prompt` opens the assistant's turn (the default);
    `continue_final_message` leaves the last message open instead, so the
    answer continues it (a prefilled answer); `kwargs` are more variables for
    the template (vLLM's `chat_template_kwargs`, such as `enable_thinking`);
    `documents` are vLLM's (retrieved passages for templates that render
    them, each an object of strings); `add_special_tokens` lets the
    tokenizer add its own (a BOS) to the rendered text, which the template
    usually writes itself (vLLM's default for chat: false)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    documents: list[dict[str, str]] | None = None
    add_special_tokens: bool = False

    def verify(self, messages: Sequence[dict[str, Any]]) -> None:
        check_bool(self.add_generation_prompt, "add_generation_prompt")
        check_bool(self.continue_final_message, "continue_final_message")
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequestError("continue_final_message and add_generation_prompt cannot both be true "
                                      "(set add_generation_prompt to false)", param="continue_final_message")
        if not isinstance(self.kwargs, dict):
            raise InvalidRequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
        check_json(self.kwargs, "chat_template_kwargs")
        check_bool(self.add_special_tokens, "add_special_tokens")
        if self.documents is not None:
            if not isinstance(self.documents, list) or len(self.documents) > MAX_DOCUMENTS:
                raise InvalidRequestError(f"documents must be a list of at most {MAX_DOCUMENTS} objects",
                                          param="documents")
            for index, document in enumerate(self.documents):
                if not isinstance(document, dict):
                    raise InvalidRequestError(f"documents[{index}] must be an object of strings",
                                              param=f"documents[{index}]")
                for key, value in document.items():
                    check_text(key, f"documents[{index}]")
                    check_text(value, f"documents[{index}].{key}")
        for key in self.kwargs:
            if not key.isidentifier() or key in RESERVED_TEMPLATE_KWARGS:
                raise InvalidRequestError(f"chat_template_kwargs cannot set {key!r}", param="chat_template_kwargs")
        # The template's renderer finds the open message by its text: with none
        # it would leave the turn closed and the answer would not continue it.
        if self.continue_final_message and not str(messages[-1].get("content") or "").strip():
            raise InvalidRequestError("continue_final_message needs a last message with text to continue",
                                      param="continue_final_message")

    @property
    def is_default(self) -> bool:
        return self == TemplateOptions()


@dataclass
class ChatRequest:
    """What a gateway sends: chat messages plus settings. The engine renders
    the chat template (with and without the preference) itself."""

    request_id: str
    messages: list[dict[str, str]]  # [{"role": ..., "content": ...}], content already flattened to text
    preferences: list[Preference] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    guidance: GuidanceParams = field(default_factory=GuidanceParams)
    structured: StructuredOutput | None = None  # None: free text
    template: TemplateOptions = field(default_factory=TemplateOptions)
    priority: int = 0  # lower is admitted first, under the priority scheduling policy
    # The Responses API's truncation "auto": where the prompts would not fit
    # the context, the oldest messages after the leading system ones leave
    # (PadEngine._encode_fitting), not the request.
    drop_oldest_messages: bool = False

    def verify(self, limits: RequestLimits) -> None:
        """The request's own bounds (the engine adds what needs the model:
        roles, context length, reward model names). Raises InvalidRequestError."""
        check_text(self.request_id, "request_id")
        if not isinstance(self.messages, list) or not self.messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        for index, message in enumerate(self.messages):
            if not isinstance(message, dict):
                raise InvalidRequestError(f"messages[{index}] must be an object", param=f"messages[{index}]")
            for key, value in message.items():
                check_text(key, f"messages[{index}]")
                if isinstance(value, str):
                    check_text(value, f"messages[{index}].{key}")
        if not isinstance(self.preferences, list):
            raise InvalidRequestError("preference must be a list", param="preference")
        verify_preferences(self.preferences, limits)
        self.sampling.verify()
        self.guidance.verify(limits)
        if self.structured is not None:
            self.structured.verify()
        self.template.verify(self.messages)
        check_int(self.priority, "priority")

    def text_length(self) -> int:
        """Characters of every message and preference: a cheap bound on the
        prompt before it is tokenized (a token covers at most so many)."""
        messages = sum(len(v) for m in self.messages for v in m.values() if isinstance(v, str))
        return messages + sum(len(p.text) for p in self.preferences)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatRequest:
        return cls(
            request_id=data["request_id"],
            messages=[dict(m) for m in data["messages"]],
            preferences=[Preference(**p) for p in data.get("preferences") or []],
            sampling=SamplingParams.from_dict(data.get("sampling")),
            guidance=GuidanceParams(**(data.get("guidance") or {})),
            structured=StructuredOutput.from_dict(data["structured"]) if data.get("structured") else None,
            template=TemplateOptions(**(data.get("template") or {})),
            priority=data.get("priority", 0),
            drop_oldest_messages=data.get("drop_oldest_messages", False),
        )


@dataclass
class TextRequest:
    """A raw-text prompt (OpenAI's legacy /v1/completions): no chat template.
    `prompt` is text or token ids. Each preference's reward context is the
    prompt after the filled preference template (PromptBuilder.encode_text)."""

    request_id: str
    prompt: str | list[int]
    preferences: list[Preference] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    guidance: GuidanceParams = field(default_factory=GuidanceParams)
    structured: StructuredOutput | None = None  # None: free text
    priority: int = 0  # as ChatRequest's
    add_special_tokens: bool = True  # vLLM's: the tokenizer adds its own (a BOS) to a text prompt
    kind: Literal["text"] = "text"  # tells the worker it is not a ChatRequest

    def verify(self, limits: RequestLimits) -> None:
        check_text(self.request_id, "request_id")
        if isinstance(self.prompt, str):
            check_text(self.prompt, "prompt")
            if not self.prompt:
                raise InvalidRequestError("prompt is empty", param="prompt")
        elif isinstance(self.prompt, list) and self.prompt:
            for token in self.prompt:
                check_int(token, "prompt", 0, INT64_MAX)
        else:
            raise InvalidRequestError("prompt must be text or a non-empty list of token ids", param="prompt")
        if not isinstance(self.preferences, list):
            raise InvalidRequestError("preference must be a list", param="preference")
        verify_preferences(self.preferences, limits)
        self.sampling.verify()
        self.guidance.verify(limits)
        if self.structured is not None:
            self.structured.verify()
        check_int(self.priority, "priority")
        check_bool(self.add_special_tokens, "add_special_tokens")

    def text_length(self) -> int:
        prompt = len(self.prompt) if isinstance(self.prompt, str) else 0
        return prompt + sum(len(p.text) for p in self.preferences)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextRequest:
        prompt = data["prompt"]
        return cls(
            request_id=data["request_id"],
            prompt=prompt if isinstance(prompt, str) else list(prompt),
            preferences=[Preference(**p) for p in data.get("preferences") or []],
            sampling=SamplingParams.from_dict(data.get("sampling")),
            guidance=GuidanceParams(**(data.get("guidance") or {})),
            structured=StructuredOutput.from_dict(data["structured"]) if data.get("structured") else None,
            priority=data.get("priority", 0),
            add_special_tokens=data.get("add_special_tokens", True),
        )


@dataclass(frozen=True)
class RewardPrompt:
    """One reward (PersRM) context: the prompt with one preference in it."""

    prompt_ids: tuple[int, ...]
    weight: float = 1.0


@dataclass
class GenerationRequest:
    """Token-level request: a base context and zero or more reward contexts.
    No reward context: plain decoding, no reward rows, no overhead."""

    request_id: str
    prompt_ids: list[int]
    reward_prompts: list[RewardPrompt] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    guidance: GuidanceParams = field(default_factory=GuidanceParams)
    structured: StructuredOutput | None = None
    priority: int = 0  # lower is admitted first, under the priority scheduling policy (vLLM's)
    # sampling.bad_words as token ids (pad_core.token_controls.bad_words_ids):
    # each word alone and after a space, as the tokenizer writes it (made
    # when the engine admits a request that lacks them). truncate_prompt_tokens
    # acts where the engine tokenizes (prepare_chat, prepare_text): ids given
    # here are taken as they are.
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    def verify(self, limits: RequestLimits) -> None:
        """The settings' bounds (the engine checks the token ids against its vocabulary)."""
        check_text(self.request_id, "request_id")
        for index, prompt in enumerate(self.reward_prompts):
            check_float(prompt.weight, f"reward_prompts[{index}].weight", -MAX_WEIGHT, MAX_WEIGHT)
        self.sampling.verify()
        self.guidance.verify(limits)
        if self.structured is not None:
            self.structured.verify()
        check_int(self.priority, "priority")


@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the base model, after the
    request's sampling rules (penalties, logit_bias, vLLM's top_k ..., a
    grammar's legal tokens), as OpenAI reports it; of a prompt
    token, under the plain model (None for the prompt's first token, which
    nothing precedes)."""

    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[tuple[str, float, list[int]]] = field(default_factory=list)
    # What vLLM's prompt_logprobs report besides: the token's id and its rank
    # in its row (1: the most likely), and the ids of top_logprobs' tokens.
    token_id: int | None = None
    rank: int | None = None
    top_ids: list[int] = field(default_factory=list)
    # False for an answer's special token that skip_special_tokens leaves out
    # of its text: it adds nothing there (legacy text_offset).
    in_text: bool = True


@dataclass
class StepOutput:
    """What one engine step produced for one request.

    `text` is the new text since the previous output (it may be empty while
    bytes of a multi-byte character or a possible stop string are held back).
    `finish_reason` is set exactly once, on the request's last output.
    `tool_calls` is set on the last output of a "tool_calls" request whose
    grammar completed (its `text` deltas are the raw JSON of the calls).
    `guidance` is set on a request's first output only: the PAD settings
    the engine resolved for it (`weight`, `top_k`, `min_p`: the request's
    own or the engine's defaults), so a gateway can report what was used.
    `error_param` is set on an "error" output whose cause is a value of the
    request (the OpenAI field: "response_format" or "tools" for a schema
    the grammar engine could not follow): the client's fault, a 400.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    tool_calls: list[ToolCall] | None = None
    guidance: dict[str, Any] | None = None
    error_param: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output, when asked (SamplingParams)
    prompt_token_ids: list[int] | None = None  # on the first output, with SamplingParams.return_token_ids
    cached_tokens: int = 0  # of prompt_tokens, those the prefix cache held (OpenAI's usage cached_tokens)
    # On the last output of an answer a stop ended: the stop string it matched, or the request's own
    # stop token id (vLLM's stop_reason); None for the end-of-sequence token and any other end.
    stop_reason: str | int | None = None
    # On the last output: seconds the request spent in each phase it reached ("queue", "prefill", "decode");
    # timings, not what was produced: outside equality.
    phase_seconds: dict[str, float] | None = dataclasses.field(default=None, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        """The output as plain data (for msgpack). Written out rather than
        dataclasses.asdict, which deep-copies every value: the worker sends
        every running request's output each step, so this is on the step's
        path (benchmarks/step_host_cost.py, "IPC")."""
        return {
            "request_id": self.request_id,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "logprobs": None if self.logprobs is None else [dataclasses.asdict(lp) for lp in self.logprobs],
            "error": self.error,
            "tool_calls": None if self.tool_calls is None else [dataclasses.asdict(call) for call in self.tool_calls],
            "guidance": self.guidance,
            "error_param": self.error_param,
            "prompt_logprobs": None if self.prompt_logprobs is None else [
                dataclasses.asdict(lp) for lp in self.prompt_logprobs],
            "prompt_token_ids": self.prompt_token_ids,
            "cached_tokens": self.cached_tokens,
            "stop_reason": self.stop_reason,
            "phase_seconds": self.phase_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepOutput:
        tool_calls = data.get("tool_calls")
        if tool_calls is not None:
            tool_calls = [ToolCall(**call) for call in tool_calls]
        return cls(**{**data, "logprobs": _logprobs_from(data.get("logprobs")), "tool_calls": tool_calls,
                      "prompt_logprobs": _logprobs_from(data.get("prompt_logprobs"))})


def _logprobs_from(entries: list[dict[str, Any]] | None) -> list[TokenLogprob] | None:
    if entries is None:
        return None
    return [TokenLogprob(token=lp["token"], logprob=lp["logprob"], bytes=list(lp["bytes"]),
                         top_logprobs=[tuple(t) for t in lp.get("top_logprobs") or []],
                         token_id=lp.get("token_id"), rank=lp.get("rank"), top_ids=list(lp.get("top_ids") or ()),
                         in_text=lp.get("in_text", True))
            for lp in entries]
