"""From chat messages to token ids: the base context and one reward context
per preference (the preference as a system message, PAD's template)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Sequence
from typing import Any

from jinja2 import TemplateError

from pad_core.errors import InvalidRequestError
from pad_core.types import Preference, TemplateOptions, ToolFunction

DEFAULT_TEMPLATE = TemplateOptions()

ROLES = ("system", "user", "assistant")


def preference_system_message(template: str, preference: str, system: str | None) -> str:
    text = template.format(preference=preference.strip())
    return f"{text}\n\n{system}" if system else text


def with_preference(messages: Sequence[dict[str, str]], template: str, preference: str) -> list[dict[str, str]]:
    """The conversation with the preference in its (first) system message."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = preference_system_message(template, preference, messages[0]["content"])
        return messages
    return [{"role": "system", "content": preference_system_message(template, preference, None)}, *messages]


def text_with_preference(text: str, template: str, preference: str) -> str:
    """A raw-text prompt with the filled preference template before it."""
    return f"{template.format(preference=preference.strip())}\n\n{text}"


def tool_instructions(tools: Sequence[ToolFunction], tool_choice: str | None, optional: bool = False) -> str:
    """A system-message text that tells a model whose chat template knows no
    tools which functions exist and how a call is written (the grammar then
    holds it to that form). `optional` (tool_choice "auto"): a call only if
    it helps, else a plain answer."""
    described = "\n".join(
        json.dumps(
            {k: v for k, v in (("name", t.name), ("description", t.description), ("parameters", t.parameters)) if v},
            ensure_ascii=False,
        )
        for t in tools
    )
    call_form = '[{"name": "<function name>", "arguments": {<the arguments>}}]'
    if optional:
        return (
            f"You can call these functions:\n{described}\nIf calling one of them helps to answer, answer only "
            f"with a JSON list of calls: {call_form}. Otherwise, answer the user directly."
        )
    which = f"Call the function {tool_choice}." if tool_choice else "Call one or more of these functions."
    return f"You can call these functions:\n{described}\n{which} Answer only with a JSON list of calls: {call_form}"


def with_tool_instructions(
    messages: Sequence[dict[str, str]], tools: Sequence[ToolFunction], tool_choice: str | None, optional: bool = False
) -> list[dict[str, str]]:
    """The conversation with the tool instructions in its (first) system message."""
    text = tool_instructions(tools, tool_choice, optional)
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
        return messages
    return [{"role": "system", "content": text}, *messages]


def openai_tools(tools: Iterable[ToolFunction]) -> list[dict[str, Any]]:
    """Tools in the OpenAI shape chat templates with tool support expect."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.parameters or {"type": "object"},
            },
        }
        for t in tools
    ]


def validate_messages(messages: Sequence[dict[str, str]]) -> None:
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise InvalidRequestError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}", param=f"messages[{index}].role"
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError(f"messages[{index}].content must be text", param=f"messages[{index}].content")


class PromptBuilder:
    """Renders conversations with the tokenizer's chat template."""

    def __init__(self, tokenizer, preference_template: str):
        self.tokenizer = tokenizer
        self.preference_template = preference_template
        self._own_arguments: frozenset[str] | None = None

    @property
    def template_knows_tools(self) -> bool:
        """Whether the chat template renders a `tools` argument itself."""
        return "tools" in (getattr(self.tokenizer, "chat_template", None) or "")

    def encode(self, messages: Sequence[dict[str, str]], tools: list[dict[str, Any]] | None = None,
               template: TemplateOptions = DEFAULT_TEMPLATE) -> list[int]:
        """The chat through the template (ending with the assistant's turn
        opening, unless `template` says otherwise); the template writes its
        own special tokens, so the tokenizer adds none unless
        `template.add_special_tokens`."""
        extra = {"tools": tools} if tools else {}
        if template.documents is not None:
            extra["documents"] = [dict(document) for document in template.documents]
        if template.kwargs:
            own = self._template_arguments()
            for key in template.kwargs:
                if key in own:
                    raise InvalidRequestError(f"chat_template_kwargs cannot set {key!r}", param="chat_template_kwargs")
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=template.add_generation_prompt,
                continue_final_message=template.continue_final_message, tokenize=False, **template.kwargs, **extra)
        except (ValueError, TypeError, ArithmeticError, LookupError, TemplateError) as exc:
            # continue_final_message on a message the template rewrites, a template that
            # raises on the chat, or chat_template_kwargs of a type the template cannot use
            raise InvalidRequestError(f"the chat template cannot render this chat: {exc}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=template.add_special_tokens)["input_ids"]

    def _template_arguments(self) -> frozenset[str]:
        """apply_chat_template's own parameters (chat_template_kwargs cannot set them)."""
        if self._own_arguments is None:
            self._own_arguments = frozenset(inspect.signature(self.tokenizer.apply_chat_template).parameters)
        return self._own_arguments

    def encode_with_preference(
        self, messages: Sequence[dict[str, str]], preference: str, tools: list[dict[str, Any]] | None = None,
        template: TemplateOptions = DEFAULT_TEMPLATE,
    ) -> list[int]:
        return self.encode(with_preference(messages, self.preference_template, preference), tools, template)

    def encode_request(
        self,
        messages: Sequence[dict[str, str]],
        preferences: Sequence[Preference],
        base_sees_preference: bool,
        tools: Sequence[ToolFunction] = (),
        tool_choice: str | None = None,
        optional_tools: bool = False,
        template: TemplateOptions = DEFAULT_TEMPLATE,
    ) -> tuple[list[int], list[list[int]]]:
        """Base prompt ids, and one reward prompt per preference.

        With base_sees_preference the base context gets all preferences joined
        (as the original PAD scripts give both models the same prefix). Tools
        (a tool-call request) go through the chat template where it knows
        them, else into the system message (with_tool_instructions); every
        context sees them. Optional tools (tool_choice "auto") always go into
        the system message: the model must know the one form of a call the
        grammar takes (a template's own form, such as <tool_call> tags, would
        read as text) and that it may answer in text instead."""
        validate_messages(messages)
        template_tools = None
        if tools and self.template_knows_tools and not optional_tools:
            template_tools = openai_tools(tools)
        elif tools:
            messages = with_tool_instructions(messages, tools, tool_choice, optional_tools)
        rewards = [self.encode_with_preference(messages, p.text, template_tools, template) for p in preferences]
        if base_sees_preference and preferences:
            joined = "\n".join(p.text.strip() for p in preferences)
            return self.encode_with_preference(messages, joined, template_tools, template), rewards
        return self.encode(messages, template_tools, template), rewards

    def encode_text(
        self, prompt: str | Sequence[int], preferences: Sequence[Preference], base_sees_preference: bool,
        add_special_tokens: bool = True,
    ) -> tuple[list[int], list[list[int]]]:
        """A raw-text prompt (legacy completions: no chat template), as text
        or token ids: base prompt ids, and one reward prompt per preference,
        the prompt after the filled preference template and a blank line
        (text_with_preference). With base_sees_preference the base context
        gets that prefix too, all preferences joined. `add_special_tokens`
        (vLLM's, default true) lets the tokenizer add its own to a text."""
        special = {"add_special_tokens": add_special_tokens}
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, **special)["input_ids"]

            def prefixed(preference: str) -> list[int]:
                text = text_with_preference(prompt, self.preference_template, preference)
                return self.tokenizer(text, **special)["input_ids"]
        else:
            ids = list(prompt)

            def prefixed(preference: str) -> list[int]:
                prefix = text_with_preference("", self.preference_template, preference)
                return self.tokenizer(prefix, **special)["input_ids"] + ids

        rewards = [prefixed(p.text) for p in preferences]
        if base_sees_preference and preferences:
            return prefixed("\n".join(p.text.strip() for p in preferences)), rewards
        return ids, rewards
