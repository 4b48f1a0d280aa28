"""From chat messages to token ids: the base context and one reward context
per preference (the preference as a system message, PAD's template)."""

from __future__ import annotations

from collections.abc import Sequence

from pad_core.errors import InvalidRequestError
from pad_core.types import Preference

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

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_with_preference(self, messages: Sequence[dict[str, str]], preference: str) -> list[int]:
        return self.encode(with_preference(messages, self.preference_template, preference))

    def encode_request(
        self, messages: Sequence[dict[str, str]], preferences: Sequence[Preference], base_sees_preference: bool
    ) -> tuple[list[int], list[list[int]]]:
        """Base prompt ids, and one reward prompt per preference.

        With base_sees_preference the base context gets all preferences joined
        (as the original PAD scripts give both models the same prefix)."""
        validate_messages(messages)
        rewards = [self.encode_with_preference(messages, p.text) for p in preferences]
        if base_sees_preference and preferences:
            joined = "\n".join(p.text.strip() for p in preferences)
            return self.encode_with_preference(messages, joined), rewards
        return self.encode(messages), rewards
