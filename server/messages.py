"""OpenAI conversations -> the engine's text messages ([{"role", "content"}]
with roles system / user / assistant and text content).

- Text parts are joined; image, audio and file parts are refused by name.
- `developer` is a system message.
- Tool use in the history is flattened to text, because the chat template
  (SmolLM2's) cannot render it: an assistant's earlier calls become the same
  JSON list a forced tool call produces (`[{"name": ..., "arguments":
  {...}}]`), and a tool's result a user message that names the call.
- The Responses API's input items (messages, function_call,
  function_call_output; reasoning items are skipped) map to the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from server.errors import invalid
from server.openai_models import ChatMessage

ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
TEXT_PARTS = ("text", "input_text", "output_text", "refusal")


def part_text(part: Any, param: str) -> str:
    """The text of one content part (chat `text`, Responses `input_text` /
    `output_text`, an assistant's `refusal`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    text = part.get("refusal" if kind == "refusal" else "text") if isinstance(part, dict) else None
    if kind not in TEXT_PARTS:
        raise invalid(f"{param}: '{kind}' parts are not supported (text only)", param, "unsupported_content")
    if not isinstance(text, str):
        field = "refusal" if kind == "refusal" else "text"
        raise invalid(f"{param}: a '{kind}' part needs '{field}' (a string)", f"{param}.{field}",
                      "missing_required_parameter" if field not in part else "invalid_type")
    return text


def content_text(content: Any, param: str) -> str | None:
    """A message's content (a string or a list of parts) as text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.model_dump() if hasattr(p, "model_dump") else p for p in content]
        return "\n".join(part_text(part, f"{param}[{index}]") for index, part in enumerate(parts))
    raise invalid(f"{param} must be text or a list of text parts", param)


def calls_text(calls: Iterable[tuple[str, str]]) -> str:
    """Earlier tool calls (name, JSON arguments) in the form a forced call takes."""
    out = []
    for name, arguments in calls:
        try:
            parsed = json.loads(arguments) if arguments else {}
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
            parsed = arguments  # kept as the client wrote it
        out.append({"name": name, "arguments": parsed})
    return json.dumps(out, ensure_ascii=False)


def tool_result_text(output: str, name: str | None, call_id: str | None) -> str:
    which = " ".join(part for part in (name, f"(call {call_id})" if call_id else None) if part)
    return f"Result of the tool call {which}:\n{output}" if which else f"Tool result:\n{output}"


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Chat Completions messages -> engine messages."""
    out: list[dict[str, str]] = []
    names: dict[str, str] = {}  # tool call id -> function name
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.audio is not None:
            raise invalid(f"{where}.audio is not supported (text only)", f"{where}.audio", "unsupported_content")
        text = content_text(message.content, f"{where}.content")
        if message.role in ("tool", "function"):
            if text is None:
                raise invalid(f"{where}.content is required", f"{where}.content")
            call_id = message.tool_call_id
            name = message.name or (names.get(call_id) if call_id else None)
            out.append({"role": "user", "content": tool_result_text(text, name, call_id)})
            continue
        if message.role == "assistant":
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
            for call in message.tool_calls or ():
                names[call.id] = call.function.name
            if message.function_call is not None:
                calls.append((message.function_call.name, message.function_call.arguments))
            pieces = [p for p in (text, message.refusal if text is None else None, calls_text(calls) if calls else None)
                      if p]
            if not pieces and text is None:
                raise invalid(f"{where}.content is required (or tool_calls)", f"{where}.content")
            out.append({"role": "assistant", "content": "\n".join(pieces)})
            continue
        if text is None:
            raise invalid(f"{where}.content is required", f"{where}.content")
        out.append({"role": ROLE_MAP[message.role], "content": text})
    return out


def response_input_messages(items: str | list[dict[str, Any]], instructions: str | None,
                            earlier: Iterable[dict[str, str]] = (),
                            call_names: dict[str, str] | None = None, param: str = "input",
                            require_messages: bool = True) -> list[dict[str, str]]:
    """Responses API `instructions` + `input` -> engine messages; `earlier`
    (a previous response's conversation) goes between the two, and
    `call_names` names the function calls made in it (call_id -> name), for
    the function_call_output items that answer them. Errors name the items
    as `param` (input; a conversation's items); `require_messages` False
    accepts items no model reads (another model's reasoning) alone."""
    out: list[dict[str, str]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    out.extend(earlier)
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
        return out
    names: dict[str, str] = dict(call_names or {})
    calls: dict[int, list[tuple[str, str]]] = {}  # assistant message index -> its calls, written out at the end
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        kind = item.get("type", "message")
        if item.get("id") is not None and not isinstance(item["id"], str):  # kept responses list items by id
            raise invalid(f"{where}.id must be a string", f"{where}.id", "invalid_type")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in ROLE_MAP:
                raise invalid(f"{where}.role must be one of {', '.join(ROLE_MAP)}", f"{where}.role")
            text = content_text(item.get("content"), f"{where}.content")
            if text is None:
                raise invalid(f"{where}.content is required", f"{where}.content")
            out.append({"role": ROLE_MAP[role], "content": text})
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments", "")
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise invalid(f"{where}: a function_call needs name and arguments (strings)", where)
            if isinstance(item.get("call_id"), str):
                names[item["call_id"]] = name
            if len(out) - 1 not in calls:  # parallel calls: one list, as they were made
                out.append({"role": "assistant", "content": ""})
                calls[len(out) - 1] = []
            calls[len(out) - 1].append((name, arguments))
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = content_text(output, f"{where}.output")
            if not isinstance(output, str):
                raise invalid(f"{where}.output must be text", f"{where}.output")
            call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else None
            out.append({"role": "user", "content": tool_result_text(output, names.get(call_id or ""), call_id)})
        elif kind == "reasoning":
            continue  # another model's reasoning summary: nothing this model can use
        else:
            raise invalid(f"{where}: input items of type {kind!r} are not supported "
                          "(message, function_call, function_call_output)", f"{where}.type", "unsupported_content")
    if not out and require_messages:
        raise invalid(f"{param} has no messages", param)
    for at, made in calls.items():  # once per message: 10,000 calls in a row must not cost 10,000^2
        out[at]["content"] = calls_text(made)
    return out
