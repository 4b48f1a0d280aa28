"""The one path from an OpenAI request to engine requests and back, shared
by /v1/chat/completions, /v1/completions and /v1/responses.

- `Generation.start` sends the engine requests (the n choices of a chat,
  prompts x n of a legacy completion) and waits for each one's first output
  before a byte is sent, so a request the engine refuses is a proper 400.
- `ChoiceState.update` is the one bookkeeping of a choice, for streamed and
  collected answers alike: text, finish reason, token counts, logprobs, and
  tool calls. With tool_choice "auto" the first character after any
  whitespace tells: "[" or "{" opens calls ("[" only when a response_format
  makes the other answer JSON), anything else is the answer, streamed as it
  comes.
- Tool calls stream as OpenAI streams them (`CallStream`): a call is
  announced (index, its `call_...` id, name, arguments "") once its name is
  written, then its arguments follow in fragments, exactly the model's text
  of its arguments value; the last delta has finish_reason "tool_calls".
  The fragments of a call add up to the `arguments` of the whole answer
  (pad_core.structured.parse_tool_calls returns that text, not a
  re-serialization). A call is held back while its text is still a prefix
  of an earlier call's in the same answer: the engine ends a list at a call
  that repeats an earlier one exactly (CallListScanner, comparing text) and
  drops it, so a repeat is never sent, not even its name. An answer that
  ends before its calls are complete (max_tokens: "length", or a stop
  string) is the calls begun, streamed or not (`ChoiceState.answer_calls`:
  each fragment a prefix of the text, so the last call's arguments are
  consistent, if unfinished, as OpenAI returns a call cut short), with that
  finish_reason and no content: the calls' JSON is never the answer's
  text, and with no call named yet the answer is empty. Calls carry no
  logprobs (content does).
- `Formatter`s (one per endpoint, in the routes) turn that bookkeeping into
  chunks / events and into the final object; `stream_events` drives a
  stream, `Generation.collect` a whole answer.
- `serve` wraps a route: the request counter by status, and a client that
  hangs up before its answer aborts its requests in the worker (499).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pad_core.errors import InvalidRequestError
from pad_core.types import (
    CALLS_OPENERS,
    LEADING_SPACE,
    ChatRequest,
    Preference,
    RequestLimits,
    StepOutput,
    StructuredOutput,
    TextRequest,
    TokenLogprob,
    ToolCall,
)
from server.errors import APIError, count_request, invalid, unavailable
from server.store.resolve import Resolution
from server.worker_client import QueueFull, RequestRejected, WorkerUnavailable

logger = logging.getLogger(__name__)

EngineRequest = ChatRequest | TextRequest
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- errors ------------------------------------------------------------
def engine_failure(output: StepOutput) -> APIError | None:
    if output.finish_reason == "error" and output.error_param is not None:  # a value of the request's: its fault
        return invalid(output.error or "the engine could not follow this request", output.error_param)
    if output.finish_reason == "error":
        return APIError(500, output.error or "the engine failed on this request", "server_error", None, "engine_error")
    if output.finish_reason == "abort":
        return unavailable("the request was aborted by the server", "aborted")
    return None


def map_exception(exc: BaseException) -> APIError:
    if isinstance(exc, RequestRejected):
        error = exc.error
        status = int(error.get("status") or 400)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return APIError(status, error.get("message", "invalid request"), kind, error.get("param"), error.get("code"))
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "rate_limit_error", None, "queue_full")
    if isinstance(exc, WorkerUnavailable):
        return unavailable(str(exc))
    if isinstance(exc, StopAsyncIteration):
        return unavailable("the worker ended the request without an answer")
    if isinstance(exc, APIError):
        return exc
    raise exc


async def ask_worker(state, payload: dict) -> dict:
    """The worker's tokenizer's answer (tokenize, detokenize, count_chat);
    its refusal as a 400 naming the parameter, too many asks at once as a
    429, a worker that is down or silent as a 503."""
    try:
        return await state.worker.tokenize(payload)
    except (RequestRejected, QueueFull, WorkerUnavailable) as exc:
        raise map_exception(exc) from None


async def count_prompt(state, chat: EngineRequest, resolution: Resolution, user: str | None,
                       rename: dict[str, str]) -> int:
    """The tokens of a chat's prompt as the worker renders it to run it
    (PadEngine.count_chat), refused first as its answer would be: the
    `input_tokens` of POST /v1/responses/input_tokens, /v1/messages/count_tokens."""
    verify_request(chat, state.settings, resolution, user, rename)  # what cannot cross to the worker: a 400 here
    try:
        result = await ask_worker(state, {"kind": "count_chat", "chat": chat.to_dict()})
    except APIError as error:
        raise error.renamed(rename) from None
    return result["count"]


def served_names(state) -> list[str]:
    """The names the model is served under (the worker's; the settings' until
    it is ready); answers carry the first, as vLLM's."""
    info = state.worker.model_info
    return (info.get("served_model_names") or [info.get("served_model_name") or state.settings.resolved_served_name()])


def check_model(state, model: str | None) -> str:
    """The name answers carry; a 404 for a name not served (None: the
    served model, as vLLM)."""
    names = served_names(state)
    if model is not None and model not in names:
        raise model_not_found(model, names)
    return names[0]


def model_not_found(model: str, names: list[str]) -> APIError:
    return APIError(404, f"The model '{model}' does not exist; this server serves "
                    f"{', '.join(repr(name) for name in names)}", "invalid_request_error", "model", "model_not_found")


def sampling_defaults(state) -> dict:
    """The served model's defaults of a request's missing sampling fields
    (its generation config, read by the worker); {} before a worker is ready."""
    return state.worker.model_info.get("sampling_defaults") or {}


def check_fan_out(state, count: int, param: str = "n") -> None:
    """More engine requests than the server ever runs at once is a 400 (a 429
    that retrying can never cure)."""
    if count > state.settings.max_queue:
        raise invalid(f"{param} = {count} is more than this server ever runs at once "
                      f"(max_queue = {state.settings.max_queue})", param)


def verify_request(request: EngineRequest, settings, resolution: Resolution, user: str | None,
                   rename: dict[str, str]) -> None:
    """The request types' one validation (pad_core.types, the same the
    engine and the store run), its errors named as the client wrote them."""
    try:
        request.verify(RequestLimits.from_settings(settings))
    except InvalidRequestError as exc:
        if resolution.source == "profile" and (exc.param or "").startswith("preference"):
            raise APIError(400, f"the preferences stored for user {user!r} cannot be used ({exc.message}); "
                                f"replace them with PUT /v1/users/{{user_id}}/preferences", "invalid_request_error",
                           "user", exc.code) from None
        raise APIError.from_invalid(exc, rename) from None


# ---- one choice's bookkeeping ------------------------------------------
def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """One step of one streamed tool call, in the order the client gets them:
    its announcement (`name` set, arguments ""), fragments of its arguments,
    then `done` (its arguments are complete: the Responses API's
    function_call_arguments.done; the chat stream has no such chunk)."""

    index: int  # the call's place in the answer's list
    id: str
    name: str | None = None
    arguments: str = ""
    done: bool = False

    @property
    def on_the_wire(self) -> bool:
        """Whether a chat chunk carries it (an announcement or a fragment)."""
        return self.name is not None or bool(self.arguments)


@dataclass
class Delta:
    """What one engine output adds to a choice, as the client sees it."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: list[CallDelta] = field(default_factory=list)
    finish_reason: str | None = None
    # The answer's token ids since the last delta sent (vLLM's return_token_ids):
    # ids alone make no delta; they wait for the next one (the last has a
    # finish_reason, so none is lost).
    token_ids: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.logprobs or self.calls or self.finish_reason)


# ---- tool calls as they are written -----------------------------------
@dataclass
class WrittenCall:
    """Where one call object of a calls answer lies in its text."""

    start: int  # its "{"
    end: int | None = None  # past its "}", once written
    name: str | None = None  # once its "name" string is complete
    arguments_start: int | None = None  # the first character of its "arguments" value
    arguments_end: int | None = None  # past that value, once complete


class CallTextScanner:
    """Follows the JSON text of a calls answer (a list of call objects, or
    one call's object, after any whitespace) character by character and
    finds each call, its name and its arguments' value as written. Only the
    call objects' own members are parsed; a value's inside only counts
    brackets and strings. Linear in the text: each character is seen once."""

    def __init__(self):
        self.text = ""
        self.calls: list[WrittenCall] = []
        self._call_depth = 0  # depth inside a call object: 2 in a list, 1 alone; 0 before the first character
        self._depth = 0  # brackets and braces open outside strings
        self._in_string = False
        self._escaped = False
        self._open: WrittenCall | None = None  # the call being written
        self._phase = "key"  # in the open call: key, colon, value, scalar (a number or literal), after
        self._key: str | None = None
        self._key_start = 0
        self._value_start = 0

    def feed(self, text: str) -> None:
        start = len(self.text)
        self.text += text
        for offset, char in enumerate(text):
            self._step(start + offset, char)

    def written(self, call: WrittenCall) -> str:
        """The call's text so far (whole, once it ends)."""
        return self.text[call.start:call.end if call.end is not None else len(self.text)]

    def arguments(self, call: WrittenCall) -> str:
        """The call's arguments as written so far: a prefix of their final text."""
        if call.arguments_start is None:
            return ""
        end = call.arguments_end if call.arguments_end is not None else len(self.text)
        return self.text[call.arguments_start:end]

    def _step(self, index: int, char: str) -> None:
        if self._in_string:
            self._string_char(index, char)
        elif not self._call_depth:
            if char not in LEADING_SPACE:
                self._call_depth = 2 if char == "[" else 1
                self._structure(index, char)
        elif self._open is not None and self._depth == self._call_depth:
            self._member_char(index, char)
        else:
            self._structure(index, char)

    def _string_char(self, index: int, char: str) -> None:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            self._in_string = False
            if self._open is not None and self._depth == self._call_depth:
                if self._phase == "key":
                    self._key, self._phase = json_string(self.text[self._key_start:index + 1]), "colon"
                else:
                    self._value_done(index + 1)

    def _structure(self, index: int, char: str) -> None:
        """Outside the call objects' members: the list, or inside a value."""
        if char == '"':
            self._in_string, self._escaped = True, False
        elif char in "[{":
            self._depth += 1
            if self._open is None and char == "{" and self._depth == self._call_depth:
                self._open, self._phase = WrittenCall(index), "key"
                self.calls.append(self._open)
        elif char in "]}":
            self._depth -= 1
            if self._open is not None and self._depth == self._call_depth:  # the value's container closed
                self._value_done(index + 1)

    def _member_char(self, index: int, char: str) -> None:
        """A character directly inside the open call object, outside strings."""
        if self._phase == "scalar":
            if char not in LEADING_SPACE and char not in ",}":
                return
            self._value_done(index)  # a number or literal ends at the character after it
        if char in LEADING_SPACE:
            return
        if self._phase == "colon":
            if char == ":":
                self._phase = "value"
        elif self._phase == "value":
            self._value_start = index
            if self._key == "arguments":
                self._open.arguments_start, self._open.arguments_end = index, None
            if char == '"':
                self._in_string, self._escaped = True, False
            elif char in "[{":
                self._depth += 1
            else:
                self._phase = "scalar"
        elif char == '"':  # a key (phase "key")
            self._in_string, self._escaped, self._key_start = True, False, index
        elif char == ",":
            self._phase = "key"
        elif char == "}":
            self._depth -= 1
            self._open.end, self._open = index + 1, None

    def _value_done(self, end: int) -> None:
        if self._key == "name" and self.text[self._value_start] == '"':
            self._open.name = json_string(self.text[self._value_start:end])
        elif self._key == "arguments":
            self._open.arguments_end = end
        self._phase = "after"


def json_string(text: str) -> str | None:
    """A JSON string's value; None if it is none (never under the grammar,
    but a stream must not fail on a text it only reads along)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


class CallStream:
    """A calls answer as OpenAI streams it: each call announced once its name
    is written, then its arguments in fragments as written, then done; the
    one bookkeeping of the calls of a choice (streamed or not: a whole
    answer just keeps the calls at the end).

    A call is held back, announcement included, while its text is still a
    prefix of an earlier call's in the answer: the engine drops a call that
    repeats an earlier one exactly (pad_core.structured.CallListScanner, by
    text as well) and ends the list there, so a call that may yet become a
    repeat is not sent; one that has diverged never can, and goes out at
    once. Calls go out in order: one still held (or still without its name)
    holds back those after it (a repeat is the last call the engine writes)."""

    def __init__(self):
        self.scanner = CallTextScanner()
        self.sent: list[dict] = []  # the calls as streamed so far, OpenAI-shaped, with their ids
        self._released = 0  # the calls known to be no repeat: calls[:_released]
        self._done = 0  # the calls whose `done` went out: sent[:_done]

    @property
    def done(self) -> int:
        return self._done

    def feed(self, text: str) -> list[CallDelta]:
        """Takes the answer's next text; what of its calls can go out now."""
        self.scanner.feed(text)
        deltas: list[CallDelta] = []
        for index in range(self._done, len(self.scanner.calls)):  # the calls done have nothing more to send
            call = self.scanner.calls[index]
            if call.name is None or not self._release(index, call):
                break
            deltas += self._advance(index, call.name, self.scanner.arguments(call), call.end is not None)
        return deltas

    def finish(self, calls: list[ToolCall]) -> list[CallDelta]:
        """The engine's final calls (the answer completed): whatever of them
        has not gone out yet. They are the calls streamed, by construction;
        a disagreement (never seen) is logged and no fragment is sent that
        would not extend what the client holds."""
        if len(self.sent) > len(calls):
            logger.warning("%d calls were streamed, but the answer has %d", len(self.sent), len(calls))
        deltas: list[CallDelta] = []
        for index, call in enumerate(calls):
            deltas += self._advance(index, call.name, call.arguments, True)
        return deltas

    def final(self, calls: list[ToolCall]) -> list[dict]:
        """The answer's calls, OpenAI-shaped, each with the id it was announced with."""
        return [{"id": sent["id"], "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for sent, call in zip(self.sent, calls, strict=False)]

    def _release(self, index: int, call: WrittenCall) -> bool:
        if index < self._released:
            return True
        written = self.scanner.written(call)
        if any(self.scanner.written(earlier).startswith(written) for earlier in self.scanner.calls[:index]):
            return False  # it may still turn out a repeat, which the engine drops
        self._released = index + 1
        return True

    def _advance(self, index: int, name: str, arguments: str, complete: bool) -> list[CallDelta]:
        """The call's deltas to go out, given its name and its arguments so far."""
        deltas = []
        if index == len(self.sent):
            self.sent.append({"id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}})
            deltas.append(CallDelta(index, self.sent[index]["id"], name=name))
        ident, function = self.sent[index]["id"], self.sent[index]["function"]
        if function["name"] != name or not arguments.startswith(function["arguments"]):
            logger.warning("call %d was streamed as %s(%s), not %s(%s): nothing more of it is sent",
                           index, function["name"], function["arguments"][:80], name, arguments[:80])
        elif len(arguments) > len(function["arguments"]):
            fragment = arguments[len(function["arguments"]):]
            function["arguments"] = arguments
            deltas.append(CallDelta(index, ident, arguments=fragment))
        if complete and index == self._done:
            self._done += 1
            deltas.append(CallDelta(index, ident, done=True))
        return deltas


@dataclass
class ChoiceState:
    index: int
    group: int = 0  # which prompt (legacy completions): usage counts each prompt once
    holds_calls: bool = False  # a forced tool call: the JSON text is not content
    may_call: bool = False  # tool_choice "auto", undecided until the answer's first character
    call_openers: tuple[str, ...] = CALLS_OPENERS  # what that first character is when the answer is calls
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's)
    ended_at: float | None = None  # perf_counter seconds of its last output (metrics)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # the engine's queue / prefill / decode times
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the prefix cache held
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[dict] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's tokens, when asked (legacy echo)
    prompt_token_ids: list[int] | None = None  # when asked (return_token_ids)
    token_ids: list[int] = field(default_factory=list)  # the answer's, every token the engine chose
    _unsent_ids: list[int] = field(default_factory=list)  # token_ids not yet in a delta
    # tool_choice "auto": what the answer wrote before its first character decided calls or text (`decide`)
    _undecided: str = ""
    _undecided_logprobs: list[TokenLogprob] = field(default_factory=list)
    _calls: CallStream = field(default_factory=CallStream)

    @classmethod
    def of(cls, index: int, structured: StructuredOutput | None) -> ChoiceState:
        """A choice whose answer follows `structured` (None: free text)."""
        if structured is None or structured.kind != "tool_calls":
            return cls(index)
        return cls(index, holds_calls=not structured.auto, may_call=structured.auto,
                   call_openers=structured.call_openers)

    def update(self, output: StepOutput) -> Delta:
        """Records one engine output; the delta to send (falsy: nothing).
        An engine failure raises its APIError."""
        failure = engine_failure(output)
        if failure is not None:
            raise failure
        self.prompt_tokens, self.completion_tokens = output.prompt_tokens, output.completion_tokens
        self.cached_tokens = output.cached_tokens
        self.finish_reason = output.finish_reason
        if output.finished and self.ended_at is None:
            self.ended_at = time.perf_counter()
            self.stop_reason = output.stop_reason
            self.phase_seconds = output.phase_seconds or {}
        self.token_ids += output.token_ids
        self._unsent_ids += output.token_ids
        delta = self._delta(output)
        if delta:
            delta.token_ids, self._unsent_ids = self._unsent_ids, []
        return delta

    def defer_ids(self, token_ids: list[int]) -> None:
        """Token ids of a delta that sent nothing: they go with the next."""
        self._unsent_ids[:0] = token_ids

    def _delta(self, output: StepOutput) -> Delta:
        if self.may_call:
            output = self.decide(output)
            if output is None:
                return Delta()
        if self.holds_calls:
            return self.update_calls(output)
        self.text += output.text
        logprobs = list(output.logprobs or ())
        self.logprobs += logprobs
        return Delta(output.text, logprobs, finish_reason=output.finish_reason)

    @property
    def streamed_calls(self) -> list[dict]:
        """The calls sent so far (OpenAI-shaped, arguments as accumulated)."""
        return self._calls.sent

    @property
    def calls_complete(self) -> int:
        """How many of `streamed_calls` (the first ones) are complete."""
        return self._calls.done

    @property
    def answer_calls(self) -> list[dict] | None:
        """The answer's calls: the engine's (finish_reason "tool_calls"), or,
        for a calls answer that ended before they were complete, those begun
        (the last maybe cut short, as a stream gives them); None for a text
        answer."""
        if self.tool_calls is not None:
            return self.tool_calls
        return list(self._calls.sent) if self.holds_calls else None

    def update_calls(self, output: StepOutput) -> Delta:
        """A calls answer: its calls as they are written (CallStream), and at
        the end the engine's calls, or, if it ended before they were
        complete, those begun (see the module's docstring)."""
        calls = self._calls.feed(output.text)
        if not output.finished:
            return Delta(calls=calls)
        if output.tool_calls is not None:
            calls += self._calls.finish(output.tool_calls)
            self.tool_calls = self._calls.final(output.tool_calls)
            self.finish_reason = "tool_calls"
            return Delta(calls=calls, finish_reason="tool_calls")
        # Ended before the calls were complete (max_tokens, a stop string): the
        # calls begun are the answer, as streamed (a call cut short with its
        # arguments so far, as OpenAI returns one), never the calls' JSON as text.
        return Delta(calls=calls, finish_reason=output.finish_reason)

    def decide(self, output: StepOutput) -> StepOutput | None:
        """tool_choice "auto": holds outputs until the answer has a first
        character after whitespace, then says whether it is calls (it opens
        with one of `call_openers`, which the grammar lets no other answer
        do) or the answer; None while undecided, else the held outputs as one."""
        self._undecided += output.text
        self._undecided_logprobs += output.logprobs or ()
        first = self._undecided.lstrip(LEADING_SPACE)
        if not first and not output.finished:
            return None
        self.may_call = False
        self.holds_calls = first.startswith(self.call_openers)
        held = dataclasses.replace(output, text=self._undecided,
                                   logprobs=list(self._undecided_logprobs) if output.logprobs is not None else None)
        self._undecided, self._undecided_logprobs = "", []
        return held


def usage_of(choices: list[ChoiceState]) -> dict:
    """OpenAI usage: each prompt counted once, every choice's answer; of the
    prompts' tokens, those read from the prefix cache (cached_tokens, as
    OpenAI and vLLM report them)."""
    prompts = {c.group: c.prompt_tokens for c in choices}
    cached: dict[int, int] = {}  # a prompt's choices may be prefilled apart: the least any of them found
    for choice in choices:
        cached[choice.group] = min(cached.get(choice.group, choice.cached_tokens), choice.cached_tokens)
    prompt = sum(prompts.values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}


class Timing:
    """Time to first token and inter-token latency of one choice."""

    def __init__(self, metrics, started: float):
        self.metrics, self.last = metrics, started
        self.first = True

    def tick(self, output: StepOutput) -> None:
        if not output.token_ids:
            return
        self.metrics.generation_tokens.inc(len(output.token_ids))  # as they come: an answer cut short counts too
        now = time.perf_counter()
        (self.metrics.time_to_first_token if self.first else self.metrics.inter_token_latency).observe(now - self.last)
        self.first, self.last = False, now


# ---- the engine requests of one HTTP request ---------------------------
@dataclass
class Generation:
    """The engine requests of one HTTP request and their choices."""

    state: Any  # app.state
    id: str
    model: str
    requests: list[EngineRequest]
    choices: list[ChoiceState]
    resolution: Resolution
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    guidance: dict | None = None  # the PAD settings the engine resolved (first output)
    rename: dict[str, str] = field(default_factory=dict)  # the engine's parameter names -> the route's
    _streams: list = field(default_factory=list)
    _firsts: list[StepOutput] = field(default_factory=list)
    _accounted: bool = False  # its choices counted in the metrics (once, however it ended)

    @property
    def metrics(self):
        return self.state.metrics

    def pad_info(self) -> dict:
        """The `pad` field of every answer: the preferences applied (with
        their weights and where they came from) and the PAD settings used."""
        preferences: list[Preference] = self.resolution.preferences
        info: dict[str, Any] = {"preferences": [{"text": p.text, "weight": p.weight} for p in preferences],
                                "source": self.resolution.source}
        guidance = dict(self.guidance or self._requested_guidance())
        # Nothing steered the answer: no preference of any weight, or no reward
        # guidance (pad.weight 0) and no preference in the base model's prompt.
        prompted = guidance.get("base_sees_preference") is True
        if all(p.weight == 0 for p in preferences) or (guidance.get("weight") == 0 and not prompted):
            guidance = {**guidance, "applied": False}
        return {**info, **guidance}

    def _requested_guidance(self) -> dict:
        """Before the engine's first output (a queued background response):
        the request's PAD settings with the worker's defaults and its
        reward model's base_sees_preference, from the worker's model info
        (as the worker will resolve them); the gateway's settings where the
        worker has not said (an older worker)."""
        guidance = getattr(self.requests[0], "guidance", None) if self.requests else None
        if guidance is None:
            return {}
        info = getattr(getattr(self.state, "worker", None), "model_info", None) or {}
        settings = getattr(self.state, "settings", None)
        defaults = info.get("guidance_defaults") or (settings.guidance_defaults() if settings is not None else None)
        if defaults is None:
            return {}
        sees = info.get("base_sees_preference", {}).get(guidance.reward_model)
        if sees is None and guidance.reward_model == "self":
            sees = False
        return guidance.resolved(defaults, sees)

    async def start(self) -> None:
        """Sends every request; returns once each has its first output. A
        refusal (the engine's validation, a full queue, no worker) is raised
        as an APIError, and nothing is left running."""
        client = self.state.worker
        try:
            client.check_available(needed=len(self.requests))
        except (QueueFull, WorkerUnavailable) as exc:
            raise map_exception(exc) from None
        self._streams = [client.generate(request) for request in self.requests]
        try:
            firsts = await asyncio.gather(*(s.__anext__() for s in self._streams), return_exceptions=True)
        except asyncio.CancelledError:  # the client went away while its request waited or prefilled
            await self.close()
            raise
        failure = next((f for f in firsts if isinstance(f, BaseException)), None)
        failure = failure or next((e for e in map(engine_failure, firsts) if e is not None), None)
        if failure is not None:  # a first token that already failed is a status too, streamed or not
            error = map_exception(failure).renamed(self.rename)
            # A refusal (4xx: the request's own doing) ran nothing: not counted, as vLLM's validation errors.
            await self.close("error" if error.status >= 500 else None)
            raise error from None
        self._firsts = list(firsts)
        for choice, first in zip(self.choices, self._firsts, strict=True):
            choice.prompt_tokens, choice.prompt_logprobs = first.prompt_tokens, first.prompt_logprobs
            choice.cached_tokens = first.cached_tokens
            choice.prompt_token_ids = first.prompt_token_ids
        self.guidance = next((f.guidance for f in self._firsts if f.guidance is not None), None)

    async def close(self, unfinished: str | None = "abort") -> None:
        """Ends every choice's stream (the worker aborts what still runs),
        counting the choices as `account` does (None: not counted)."""
        if unfinished is not None:
            self.account(unfinished)
        self._accounted = True
        await asyncio.gather(*(stream.aclose() for stream in self._streams), return_exceptions=True)

    def account(self, unfinished: str) -> None:
        """Counts this request's choices in the metrics, once however it
        ended: each that finished by its finish reason, lengths and latency;
        each other one as `unfinished` ("abort": its client went away;
        "error"); and the prompt tokens read."""
        if self._accounted:
            return
        self._accounted = True
        self.metrics.count_ended(self.choices, usage_of(self.choices)["prompt_tokens"], self.started, unfinished)

    async def _outputs_of(self, index: int) -> AsyncIterator[StepOutput]:
        first = self._firsts[index]
        yield first
        if not first.finished:
            async for output in self._streams[index]:
                yield output

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """Outputs of all choices as they come (several interleave)."""
        if len(self._streams) == 1:
            async for output in self._outputs_of(0):
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for output in self._outputs_of(index):
                    await queue.put((index, output))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((index, exc))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self._streams))]
        try:
            remaining = len(self._streams)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self) -> list[ChoiceState]:
        """Runs every choice to its end (a whole, non-streamed answer)."""
        timings = [Timing(self.metrics, self.started) for _ in self.choices]
        try:
            async for index, output in self.outputs():
                timings[index].tick(output)
                self.choices[index].update(output)
        except (WorkerUnavailable, APIError) as exc:
            await self.close("error")  # the other choices end too
            raise map_exception(exc).renamed(self.rename) from None
        except asyncio.CancelledError:
            self.account("abort")
            raise
        self.account("abort")  # every choice finished: none is counted so
        return self.choices


# ---- streaming ---------------------------------------------------------
class Formatter:
    """One endpoint's wire format over the shared bookkeeping."""

    def opening(self, generation: Generation) -> list[str]:
        return []

    def delta(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[str]:
        raise NotImplementedError

    def closing(self, generation: Generation, usage: dict) -> list[str]:
        return []

    def error(self, generation: Generation, error: APIError) -> list[str]:
        raise NotImplementedError

    def done(self) -> list[str]:
        return ["data: [DONE]\n\n"]


class ChunkFormatter(Formatter):
    """The streams of chat and text completions: `data:` chunks of one
    object type with the choices' deltas, usage where asked (on the last
    chunk, or on each with vLLM's continuous_usage_stats), an error as its
    OpenAI body. `body` is the request (include_usage, continuous_usage)."""

    chunk_object: str

    def __init__(self, body):
        self.body = body

    def chunk(self, generation: Generation, choices: list[dict], usage: dict | None = None, **extra) -> str:
        data = {"id": generation.id, "object": self.chunk_object, "created": generation.created,
                "model": generation.model, "choices": choices, **extra}
        if usage is not None:
            data["usage"] = usage
        elif self.body.continuous_usage:
            data["usage"] = usage_of(generation.choices)
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def closing(self, generation: Generation, usage: dict) -> list[str]:
        return [self.chunk(generation, [], usage)] if self.body.include_usage else []

    def error(self, generation: Generation, error: APIError) -> list[str]:
        return [f"data: {json.dumps(error.body())}\n\n"]


async def stream_events(generation: Generation, formatter: Formatter,
                        finished: Callable[[list[ChoiceState]], Awaitable[None]] | None = None,
                        failed: Callable[[], Awaitable[None]] | None = None,
                        count_status: bool = True) -> AsyncIterator[str]:
    """The stream's events; `finished` runs before the last event of an
    answer, `failed` before the error event of a stream that fails. The
    request's status is counted as the stream ends (`count_status`; a
    background response's was counted when it was queued)."""
    metrics = generation.metrics
    timings = [Timing(metrics, generation.started) for _ in generation.choices]
    status = "200"
    try:
        for event in formatter.opening(generation):
            yield event
        async for index, output in generation.outputs():
            timings[index].tick(output)
            choice = generation.choices[index]
            delta = choice.update(output)
            if delta:
                for event in formatter.delta(generation, choice, delta):
                    yield event
        usage = usage_of(generation.choices)
        generation.account("abort")  # every choice finished: none is counted so
        # Kept before the last event: a client may act on it at once (send the
        # answer back as a Responses item_reference) or hang up after it.
        if finished is not None:
            await finished(generation.choices)
        for event in formatter.closing(generation, usage):
            yield event
    except (WorkerUnavailable, APIError) as exc:
        await generation.close("error")  # the other choices end too
        error = map_exception(exc).renamed(generation.rename)
        status = str(error.status)
        if failed is not None:
            await failed()
        for event in formatter.error(generation, error):
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # the client went away; leaving the streams aborted its requests
        generation.account("abort")  # (once the answer was done, it was counted as answered)
        raise
    finally:
        if count_status:
            metrics.requests.labels(status=status).inc()
    for event in formatter.done():
        yield event


class EventStream(StreamingResponse):
    """A text/event-stream whose cleanup runs as the response ends, however
    it ends: sent whole, failed, or its client gone, even before the first
    event (its events generator has not started then, so the generator's
    own cleanup, which aborts the generation, would wait for the garbage
    collector). Then the `on_close` callbacks; all of it shielded from the
    cancellation that may be ending the response."""

    def __init__(self, events: AsyncIterator[str], on_close: Sequence[Callable[[], Awaitable[None]]] = (),
                 counts_itself: bool = True):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = list(on_close)
        self.counts_itself = counts_itself  # its status counted as it ends (stream_events), else by `serve`

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                for close in self.on_close:
                    await close()


def streaming_response(events: AsyncIterator[str], on_close: Sequence[Callable[[], Awaitable[None]]] = (),
                       counts_itself: bool = True) -> EventStream:
    return EventStream(events, on_close, counts_itself)


# ---- the route wrapper -------------------------------------------------
class ClientDisconnected(Exception):
    pass


async def _until_disconnected(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """Runs `work`; a client that goes away before it is done cancels it,
    which aborts its requests in the worker (the generators' cleanup).
    Covers a non-streaming answer and the wait for a stream's first token;
    once streaming, the response itself watches the client."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected


async def serve(request: Request, work: Awaitable) -> Response:
    """Runs a generation route: counts its status (a stream counts its own
    when it ends), and answers 499 to a client gone before its answer."""
    try:
        response = await _unless_disconnected(request, work)
    except APIError as error:
        count_request(request, error.status)
        raise
    except ClientDisconnected:
        count_request(request, 499)
        logger.info("client went away before the answer; its request was aborted")
        return Response(status_code=499)
    if isinstance(response, JSONResponse) or not getattr(response, "counts_itself", True):
        count_request(request, response.status_code)
    else:
        request.state.counted = True  # a stream counts its own status when it ends (stream_events)
    return response


def recorder(state, generation: Generation, messages, user: str | None):
    """Keeps the answers for feedback (the preference memory's store)."""

    async def record(choices: list[ChoiceState]) -> None:
        store = getattr(state, "store", None)
        if store is None:
            return
        try:
            await store.record_completion(generation.id, messages=messages, answers=[c.text for c in choices],
                                          preferences=generation.resolution.preferences, user=user,
                                          model=generation.model, created=generation.created)
        except Exception:  # feedback memory must never fail an answer
            logger.exception("could not record completion %s for feedback", generation.id)

    return record


def logprob_entry(lp: TokenLogprob, as_ids: bool = False) -> dict:
    """A chat logprobs entry; `as_ids` (vLLM's return_tokens_as_token_ids)
    names each token "token_id:{id}" (its bytes stay its own)."""
    if as_ids:
        return {"token": token_id_name(lp.token_id), "logprob": lp.logprob, "bytes": lp.bytes,
                "top_logprobs": [{"token": token_id_name(i), "logprob": v, "bytes": b}
                                 for i, (_, v, b) in zip(lp.top_ids, lp.top_logprobs, strict=False)]}
    return {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
            "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in lp.top_logprobs]}


def token_id_name(token_id: int | None) -> str:
    """vLLM's name of a token by its id, for tokens whose text is not valid JSON text."""
    return f"token_id:{token_id}"


def vllm_prompt_logprobs(entries: list[TokenLogprob] | None, count: int) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first (nothing
    precedes it), else {token id: {"logprob", "rank", "decoded_token"}} for
    the token itself and the `count` most likely there (ranks 1..count)."""
    if entries is None:
        return None
    out: list[dict | None] = []
    for lp in entries:
        if lp.logprob is None:
            out.append(None)
            continue
        position = {str(token_id): {"logprob": value, "rank": rank, "decoded_token": text}
                    for rank, (token_id, (text, value, _)) in enumerate(zip(lp.top_ids[:count], lp.top_logprobs[:count],
                                                                             strict=True), start=1)}
        position[str(lp.token_id)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.token}
        out.append(position)
    return out
