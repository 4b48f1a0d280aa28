"""POST /v1/completions (OpenAI's legacy Completions): raw text in, no chat
template. The prompt is a string, a list of strings, token ids, or a list
of token-id lists; each prompt gets n choices (choice index = prompt
index x n + i, as OpenAI numbers them). `preference` and `pad` work as in
chat: each preference's reward context is the prompt after the filled
preference template (pad_core.prompting.PromptBuilder.encode_text)."""

from __future__ import annotations

import codecs
import dataclasses
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pad_core.types import TextRequest, TokenLogprob
from server.auth import Scope, key_scope
from server.auth_scopes import chat_user
from server.generation import (
    ChoiceState,
    ChunkFormatter,
    Delta,
    Generation,
    check_fan_out,
    check_model,
    sampling_defaults,
    serve,
    stream_events,
    streaming_response,
    token_id_name,
    usage_of,
    verify_request,
    vllm_prompt_logprobs,
)
from server.openai_models import CompletionRequest, TextCompletion
from server.openapi import generation_responses
from server.request_body import JSONRoute
from server.request_id import adopt_body_request_id
from server.routes.chat import preference_rename, resolve_preferences

router = APIRouter(tags=["completions"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

COMPLETION_RESPONSES = generation_responses(
    TextCompletion, "a text_completion, or with stream: true a text/event-stream of text_completion chunks")


@router.post("/v1/completions", response_model=None, responses=COMPLETION_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request, scope: Scope):
    return await serve(request, _complete(body, request, scope))


async def _complete(body: CompletionRequest, request: Request, scope):
    state = request.app.state
    served = check_model(state, body.model)
    prompts = body.prompts()
    check_fan_out(state, len(prompts) * body.n, "n" if len(prompts) == 1 else "prompt")
    body.refuse_unsupported()
    user = chat_user(scope, body.user)
    adopt_body_request_id(request, body.request_id)
    resolution = await resolve_preferences(state, body, user)
    guidance = body.to_guidance_params()
    structured = body.to_structured()
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    defaults = sampling_defaults(state)
    requests, choices = [], []
    for group, prompt in enumerate(prompts):
        for i in range(body.n):
            index = group * body.n + i
            requests.append(TextRequest(f"{completion_id}-{index}", prompt, resolution.preferences,
                                        body.to_sampling_params(i, defaults), guidance, structured, body.priority,
                                        body.add_special_tokens))
            choices.append(ChoiceState(index, group=group))
    generation = Generation(state, completion_id, served, requests, choices, resolution)
    rename = preference_rename(body)
    for group in range(len(prompts)):
        verify_request(requests[group * body.n], state.settings, resolution, user, rename)
    generation.rename = {**rename, "messages": "prompt"}  # the engine's context-length errors say messages
    await generation.start()
    formatter = CompletionFormatter(body, prompts)
    if body.stream:
        return streaming_response(stream_events(generation, formatter), on_close=[generation.close])
    choices = await generation.collect()
    return JSONResponse(formatter.response(generation, choices))


class TextPosition:
    """Where the next token's text starts in a choice's text, counted from
    the tokens' bytes (a token's string may be a piece of a character, as
    "\ufffd", which is no measure of the text it adds): a token that opens
    or continues a multi-byte character is at that character."""

    def __init__(self, start: int):
        self.chars = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, entry: TokenLogprob) -> int:
        """The entry's offset; moves past its bytes (none for a special token
        left out of the text)."""
        offset = self.chars
        if entry.in_text:
            self.chars += len(self._decoder.decode(bytes(entry.bytes)))
        return offset


def legacy_logprobs(entries: list[TokenLogprob], position: TextPosition, as_ids: bool = False) -> dict:
    """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs (token
    -> logprob: the `logprobs` most likely and the chosen one), text_offset (from `position`, which moves past the
    entries). An echoed prompt's first token has null for both (nothing
    precedes it). `as_ids` (vLLM's return_tokens_as_token_ids) names tokens
    "token_id:{id}"; offsets stay those of their text."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in entries:
        tokens.append(token_id_name(lp.token_id) if as_ids else lp.token)
        values.append(lp.logprob)
        if lp.logprob is None:
            tops.append(None)
        elif as_ids:
            top = {token_id_name(i): value for i, (_, value, _) in zip(lp.top_ids, lp.top_logprobs, strict=False)}
            tops.append({**top, token_id_name(lp.token_id): lp.logprob})
        else:
            # The chosen token is always among them, as OpenAI and vLLM give it (up to logprobs + 1 entries).
            tops.append({**{token: value for token, value, _ in lp.top_logprobs}, lp.token: lp.logprob})
        offsets.append(position.advance(lp))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def prompt_text(prompt: str | list[int], entries: list[TokenLogprob] | None, truncated: bool = False) -> str:
    """The text an echo repeats: the prompt as given, or the text of the
    tokens the model read (their bytes, from the worker's prompt logprobs):
    of token ids, or of a prompt truncate_prompt_tokens cut."""
    if isinstance(prompt, str) and not truncated:
        return prompt
    return b"".join(bytes(lp.bytes) for lp in entries or ()).decode("utf-8", errors="replace")


class CompletionFormatter(ChunkFormatter):
    chunk_object = "text_completion"
    body: CompletionRequest

    def __init__(self, body: CompletionRequest, prompts: list):
        super().__init__(body)
        self.prompts = prompts
        self.echoed: set[int] = set()
        self.positions: dict[int, TextPosition] = {}  # per choice: where its next answer token's text starts
        self.pad_sent = False

    def echo(self, choice: ChoiceState) -> str:
        if not self.body.echo:
            return ""
        return prompt_text(self.prompts[choice.group], choice.prompt_logprobs, self.body.truncate_prompt_tokens is not None)

    def logprobs(self, choice: ChoiceState, entries: list[TokenLogprob], echo: str | None) -> dict | None:
        """Legacy logprobs of a choice's next answer tokens; with the `echo`
        text (the choice's first piece; "" without echo), the prompt's tokens
        open them (OpenAI, vLLM), at offsets from 0, and the answer's start
        exactly where the echoed text ends. Offsets count characters of the
        text, from the tokens' bytes (`TextPosition`)."""
        if echo is not None:
            self.positions[choice.index] = TextPosition(len(echo))
        if self.body.logprobs is None:
            return None
        as_ids = bool(self.body.return_tokens_as_token_ids)
        answer = legacy_logprobs(entries, self.positions[choice.index], as_ids)
        if echo is None or not self.body.echo or not choice.prompt_logprobs:
            return answer
        count = self.body.logprobs  # prompt_logprobs may have asked the worker for more
        prompt = legacy_logprobs([dataclasses.replace(lp, top_logprobs=lp.top_logprobs[:count], top_ids=lp.top_ids[:count])
                                  for lp in choice.prompt_logprobs], TextPosition(0), as_ids)
        return {key: prompt[key] + answer[key] for key in answer}

    def delta(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[str]:
        echo = None
        ids = {}
        if choice.index not in self.echoed:  # the choice's first chunk
            self.echoed.add(choice.index)
            echo = self.echo(choice)
            ids = self.prompt_ids(choice)
        if self.body.return_token_ids:
            ids["token_ids"] = delta.token_ids
        logprobs = self.logprobs(choice, delta.logprobs, echo)
        text = (echo or "") + delta.text
        extra = {} if self.pad_sent else {"pad": generation.pad_info()}  # on the first chunk
        self.pad_sent = True
        end = {"stop_reason": choice.stop_reason} if delta.finish_reason is not None else {}
        return [self.chunk(generation, [{"index": choice.index, "text": text, "logprobs": logprobs,
                                         "finish_reason": delta.finish_reason, **end, **ids}], **extra)]

    def prompt_ids(self, choice: ChoiceState) -> dict:
        """vLLM's prompt_token_ids of a choice, when asked (return_token_ids)."""
        return {"prompt_token_ids": choice.prompt_token_ids} if self.body.return_token_ids else {}

    def vllm_fields(self, choice: ChoiceState) -> dict:
        """vLLM's additions to a choice, when asked: prompt_logprobs, and the
        prompt's and answer's token ids."""
        fields = {}
        if self.body.prompt_logprobs is not None:
            fields["prompt_logprobs"] = vllm_prompt_logprobs(choice.prompt_logprobs, self.body.prompt_logprobs)
        if self.body.return_token_ids:
            fields |= {**self.prompt_ids(choice), "token_ids": choice.token_ids}
        return fields

    def response(self, generation: Generation, choices: list[ChoiceState]) -> dict:
        out = []
        for choice in choices:
            echo = self.echo(choice)
            logprobs = self.logprobs(choice, choice.logprobs, echo)
            out.append({"index": choice.index, "text": echo + choice.text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason,
                        **self.vllm_fields(choice)})
        return {"id": generation.id, "object": "text_completion", "created": generation.created,
                "model": generation.model, "choices": out, "usage": usage_of(choices), "pad": generation.pad_info()}
