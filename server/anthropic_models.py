"""Anthropic's Messages API request (POST /v1/messages, and
/v1/messages/count_tokens): its fields, checked as pydantic models, and
what they become for the engine, as vLLM and llama.cpp's servers serve it
beside the OpenAI API so that Anthropic's SDKs and the tools built on them
work with a base URL change.

- `system` (text or text blocks) is the system message; `messages` are user
  and assistant turns of text or blocks: `text`, an assistant's `tool_use`
  (written as the JSON list a forced call produces, as server/messages.py
  writes OpenAI's calls), a user's `tool_result` (a user message naming the
  call). Earlier `thinking` blocks are skipped; images and documents are
  refused by name. Consecutive turns of one role are joined, as Anthropic
  joins them. A last assistant message with text is a prefill: the answer
  continues it (Anthropic's), and holds only the new text.
- `tools` (`name`, `description`, `input_schema`) and `tool_choice` (`auto`,
  `any`, `tool`, `none`; `disable_parallel_tool_use`) become the same
  tool-call grammar as OpenAI's tools; server tools (web search...) are
  refused.
- `output_config.format` (`json_schema`) makes the answer JSON of the
  schema, as OpenAI's `response_format` does.
- `max_tokens` (required, as Anthropic's), `stop_sequences`; `temperature`
  (0-1), `top_p` and `top_k`, which Anthropic's API has since dropped but
  older clients send; `user` (PAD's, as OpenAI's) is the request's user:
  `metadata.user_id` is Anthropic's opaque id (a session's, from some
  clients), not taken as one. Fields of Anthropic's
  that change nothing here (`thinking`, `cache_control`, `service_tier`,
  `speed`...) are accepted and ignored.
- `preference` and `pad` are PAD's, as on every route."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pydantic import Field

from pad_core.types import (
    GuidanceParams,
    SamplingParams,
    StructuredOutput,
    TemplateOptions,
    ToolFunction,
)
from pad_core.validation import INT64_MAX, MAX_STOP_STRINGS
from server.errors import invalid
from server.messages import calls_text, tool_result_text
from server.openai_models import (
    DefaultsOf,
    PadOptions,
    Preferences,
    Strict,
    StrictRequest,
    guidance_of,
    reject_if,
    tool_output,
    with_answer_format,
)

REFUSED_BLOCKS = ("image", "document", "search_result", "container_upload")
SKIPPED_BLOCKS = ("thinking", "redacted_thinking")  # another turn's reasoning: nothing this model reads


class AnthropicMetadata(Strict):
    user_id: str | None = Field(None, description="accepted and ignored: Anthropic's opaque id of the end user "
                                "(clients such as Claude Code send one per session); PAD's user is `user`")


class AnthropicMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON Schema the answer follows")


class OutputConfig(Strict):
    format: OutputFormat | None = Field(None, description="structured output: the answer is JSON of the schema")
    effort: str | None = Field(None, description="accepted and ignored")


class MessagesRequest(StrictRequest):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1, le=INT64_MAX)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT64_MAX)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: AnthropicMetadata | None = None
    output_config: OutputConfig | None = None
    # Accepted and ignored.
    thinking: dict[str, Any] | None = Field(None, description="accepted and ignored: the model does not think "
                                            "apart from its answer")
    cache_control: dict[str, Any] | None = Field(None, description="accepted and ignored: the prefix cache "
                                                 "keeps every prompt's blocks")
    service_tier: str | None = None
    container: str | dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # PAD extensions.
    user: str | None = Field(None, description="PAD: the request's user (preference memory, keys bound to "
                             "users), as OpenAI's `user`")
    preference: Preferences = None
    pad: PadOptions | None = None

    def to_sampling_params(self, defaults: Mapping[str, float | int] = MappingProxyType({})) -> SamplingParams:
        """A field left out takes the model's default (its generation config), then Anthropic's (1.0)."""
        default = DefaultsOf(defaults)
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=default.of("temperature", self.temperature, 1.0),
            top_p=default.of("top_p", self.top_p, 1.0),
            top_k=max(0, default.of("top_k", self.top_k, 0)),
            min_p=default.of("min_p", None, 0.0),
            repetition_penalty=default.of("repetition_penalty", None, 1.0),
            stop=tuple(self.stop_sequences or ()),
        )

    def to_guidance_params(self) -> GuidanceParams:
        return guidance_of(self.pad)

    @staticmethod
    def to_template(messages: list[dict[str, str]]) -> TemplateOptions:
        """A last assistant message (of `engine_messages`) is a prefill: the answer continues it."""
        prefill = messages[-1]["role"] == "assistant"
        return TemplateOptions(add_generation_prompt=not prefill, continue_final_message=prefill)

    def function_tools(self) -> list[ToolFunction]:
        out = []
        for index, tool in enumerate(self.tools or ()):
            where = f"tools[{index}]"
            kind, name = tool.get("type", "custom"), tool.get("name")
            reject_if(kind != "custom", f"{where}: only client tools are supported (a name and an input_schema), "
                      f"not {kind!r}", f"{where}.type")
            reject_if(not isinstance(name, str), f"{where}.name is required (a string)", f"{where}.name",
                      "invalid_value")
            schema = tool.get("input_schema")
            reject_if(not isinstance(schema, dict) or schema.get("type") != "object",
                      f"{where}.input_schema must be a JSON Schema of type 'object' (a tool's input is an object)",
                      f"{where}.input_schema", "invalid_value")
            description = tool.get("description")
            out.append(ToolFunction(name, description if isinstance(description, str) else None, schema,
                                    tool.get("strict") is True))
        return out

    def to_structured(self) -> StructuredOutput | None:
        """tools + tool_choice -> the tool-call grammar OpenAI's tools get."""
        choice = self.tool_choice or {"type": "auto"}
        kind = choice.get("type")
        if kind == "tool":
            reject_if(not isinstance(choice.get("name"), str), "tool_choice: type 'tool' needs the tool's name",
                      "tool_choice.name", "invalid_value")
            openai_choice: Any = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "any", "none"):
            openai_choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
        else:
            raise invalid(f"tool_choice type {kind!r} is not supported (auto, any, tool, none)", "tool_choice.type",
                          "invalid_value")
        reject_if(kind != "auto" and not self.tools, "tool_choice needs tools", "tool_choice", "invalid_value")
        parallel = None if choice.get("disable_parallel_tool_use") is None else not choice["disable_parallel_tool_use"]
        calls = tool_output(self.function_tools(), openai_choice, parallel, "tool_choice")
        answer_format = self.output_config.format if self.output_config is not None else None
        json_answer = None if answer_format is None else StructuredOutput("json_schema", json_schema=answer_format.schema_)
        return with_answer_format(calls, json_answer)

    def engine_messages(self) -> list[dict[str, str]]:
        """`system` and `messages` -> the engine's text messages."""
        out = []
        system = blocks_text(self.system, "system") if self.system is not None else None
        if system:
            out.append({"role": "system", "content": system})
        names: dict[str, str] = {}  # tool_use id -> the tool's name, for the results that answer them
        for index, message in enumerate(self.messages):
            for turn in turn_messages(message, f"messages[{index}]", names):
                if out and out[-1]["role"] == turn["role"] != "system":  # one turn per role in a row, as Anthropic
                    out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{turn['content']}"}
                else:
                    out.append(turn)
        reject_if(not out or out[-1]["role"] == "system", "messages has no user or assistant text", "messages",
                  "invalid_value")
        return out


def block_kind(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise invalid(f"{where} must be a content block with a type", f"{where}.type")
    if kind in REFUSED_BLOCKS:
        raise invalid(f"{where}: '{kind}' blocks are not supported (text only)", f"{where}.type",
                      "unsupported_content")
    return kind


def text_of(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}: a text block needs text (a string)", f"{where}.text")
    return text


def blocks_text(content: str | list[Any], where: str) -> str:
    """Text, or text blocks joined (a system prompt, a tool result's content)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where} must be text or a list of text blocks", where)
    texts = []
    for index, block in enumerate(content):
        at = f"{where}[{index}]"
        kind = block_kind(block, at)
        if kind != "text":
            raise invalid(f"{at}: '{kind}' blocks are not supported here (text)", f"{at}.type",
                          "unsupported_content")
        texts.append(text_of(block, at))
    return "\n".join(texts)


def turn_messages(message: AnthropicMessage, where: str, names: dict[str, str]) -> list[dict[str, str]]:
    """One user or assistant turn as engine messages: its text and calls,
    and (a user turn) each tool result as a user message before its text."""
    if isinstance(message.content, str):  # (an empty one: nothing, as an empty final assistant turn is)
        return [{"role": message.role, "content": message.content}] if message.content else []
    texts: list[str] = []
    calls: list[tuple[str, str]] = []
    results: list[dict[str, str]] = []
    for index, block in enumerate(message.content):
        at = f"{where}.content[{index}]"
        kind = block_kind(block, at)
        if kind == "text":
            texts.append(text_of(block, at))
        elif kind in SKIPPED_BLOCKS:
            continue
        elif kind == "tool_use" and message.role == "assistant":
            name, ident, arguments = block.get("name"), block.get("id"), block.get("input", {})
            if not isinstance(name, str) or not isinstance(ident, str) or not isinstance(arguments, dict):
                raise invalid(f"{at}: a tool_use block needs id, name (strings) and input (an object)", at)
            names[ident] = name
            calls.append((name, json.dumps(arguments, ensure_ascii=False)))
        elif kind == "tool_result" and message.role == "user":
            ident = block.get("tool_use_id")
            if not isinstance(ident, str):
                raise invalid(f"{at}: a tool_result block needs tool_use_id (a string)", f"{at}.tool_use_id")
            output = blocks_text(block.get("content", ""), f"{at}.content")
            if block.get("is_error") is True:
                output = f"Error: {output}"
            results.append({"role": "user", "content": tool_result_text(output, names.get(ident), ident)})
        else:
            raise invalid(f"{at}: '{kind}' blocks are not supported in {'an' if message.role == 'assistant' else 'a'} {message.role} turn", f"{at}.type",
                          "unsupported_content")
    pieces = [piece for piece in ("\n".join(texts) if texts else None, calls_text(calls) if calls else None)
              if piece]
    if not pieces and not results:
        return []  # empty, or only skipped blocks (an earlier turn's thinking)
    return results + ([{"role": message.role, "content": "\n".join(pieces)}] if pieces else [])


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: a message request whose max_tokens
    may be left out (the other fields are checked as an answer's would be;
    those that do not shape the prompt change nothing)."""

    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="not Anthropic's here; accepted")
