"""The worker's answers to /tokenize and /detokenize (server/routes/tokenize.py):
a chat through the chat template (the prompt a chat request would give the
base model), raw text, or token ids back to text. Runs in the worker's
tokenizer thread; raises InvalidRequestError for a bad request."""

from __future__ import annotations

from typing import Any

from pad_core.errors import InvalidRequestError
from pad_core.prompting import PromptBuilder, validate_messages
from pad_core.types import ChatRequest, TemplateOptions, ToolFunction


def tokenize(prompts: PromptBuilder, request: dict[str, Any]) -> dict[str, Any]:
    """`request["kind"]`: "chat" (messages, add_generation_prompt,
    continue_final_message, chat_template_kwargs, add_special_tokens; tools,
    tool_choice and optional_tools, described as a chat request's are), "text" (prompt, add_special_tokens) -> {"count",
    "tokens", "token_strs" (with return_token_strs, else None)};
    "detokenize" (tokens) -> {"prompt"}."""
    tokenizer = prompts.tokenizer
    kind = request.get("kind")
    if kind == "detokenize":
        tokens = request["tokens"]
        if any(not 0 <= token < len(tokenizer) for token in tokens):
            raise InvalidRequestError(f"tokens must be ids below the vocabulary size, {len(tokenizer)}", param="tokens")
        return {"prompt": tokenizer.decode(tokens)}
    if kind == "chat":
        messages = request["messages"]
        validate_messages(messages)
        template = TemplateOptions(bool(request.get("add_generation_prompt", True)),
                                   bool(request.get("continue_final_message", False)),
                                   request.get("chat_template_kwargs") or {},
                                   add_special_tokens=bool(request.get("add_special_tokens", False)))
        template.verify(messages)
        try:
            tools = [ToolFunction.from_dict(tool) for tool in request.get("tools") or ()]
        except TypeError as exc:
            raise InvalidRequestError(f"malformed tools: {exc}", param="tools") from None
        ids, _ = prompts.encode_request(messages, (), False, tools=tools, tool_choice=request.get("tool_choice"),
                                        optional_tools=bool(request.get("optional_tools")), template=template)
    elif kind == "text":
        if not isinstance(request.get("prompt"), str):
            raise InvalidRequestError("prompt must be text", param="prompt")
        ids = tokenizer(request["prompt"], add_special_tokens=bool(request.get("add_special_tokens", True)))["input_ids"]
    else:
        raise InvalidRequestError(f"unknown tokenize request kind {kind!r}", param=None)
    strings = tokenizer.convert_ids_to_tokens(ids) if request.get("return_token_strs") else None
    return {"count": len(ids), "tokens": list(ids), "token_strs": strings}


def count_chat(engine, request: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/responses/input_tokens: `request["chat"]` (a ChatRequest's
    dict) -> {"count": its base prompt's tokens} (PadEngine.count_chat)."""
    try:
        chat = ChatRequest.from_dict(request["chat"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"not a chat request: {exc}", param=None) from None
    return {"count": engine.count_chat(chat)}


def tokenizer_info(tokenizer, context_length: int) -> dict[str, Any]:
    """What GET /tokenizer_info serves (vLLM's endpoint): what a client needs
    to tokenize as the server does, with /tokenize and /detokenize
    (lm-evaluation-harness's remote tokenizer reads eos_token and
    chat_template from it)."""
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": tokenizer.chat_template,
        "model_max_length": context_length,
        "vocab_size": len(tokenizer),
    }
