"""POST /v1/chat/completions: OpenAI requests in, engine requests out, and
the engine's token deltas back as chat.completion(.chunk) objects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pad_core.errors import InvalidRequestError
from pad_core.types import ChatRequest, GuidanceParams, Preference, RequestLimits, SamplingParams, StepOutput
from pad_core.validation import INT64_MIN
from server.auth import Scope, key_scope
from server.auth_scopes import chat_user
from server.errors import APIError, invalid, unavailable
from server.openai_models import ChatCompletion, ChatCompletionRequest
from server.openapi import errors
from server.request_body import JSONRoute
from server.store.resolve import UNSET, Resolution, resolve_for_request
from server.worker_client import QueueFull, RequestRejected, WorkerUnavailable

logger = logging.getLogger(__name__)
router = APIRouter(tags=["chat"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

UNSUPPORTED = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
    "audio", "modalities", "prediction", "reasoning_effort",
)  # fmt: skip
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---- request conversion ------------------------------------------------
def refuse_unsupported(body: ChatCompletionRequest) -> None:
    for name in UNSUPPORTED:
        if getattr(body, name) is not None:
            raise invalid(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    fmt = body.response_format
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if body.top_logprobs and not body.logprobs:
        raise invalid("top_logprobs requires logprobs: true", "top_logprobs")


def flatten_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """OpenAI messages -> [{"role", "content"}] with text content only."""
    messages = []
    for index, message in enumerate(body.messages):
        if message.role not in ROLE_MAP:
            raise invalid(f"messages[{index}].role '{message.role}' is not supported (no tool calling)",
                          f"messages[{index}].role", "unsupported_parameter")
        extra = set(message.model_extra or {})
        if extra:
            name = sorted(extra)[0]
            raise invalid(f"messages[{index}].{name} is not supported", f"messages[{index}].{name}", "unsupported_parameter")
        content = message.content
        if isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                if part.type != "text" or not isinstance((part.model_extra or {}).get("text"), str):
                    raise invalid(
                        f"messages[{index}].content[{part_index}]: '{part.type}' parts are not supported (text only)",
                        f"messages[{index}].content[{part_index}]",
                        "unsupported_content",
                    )
                texts.append(part.model_extra["text"])
            content = "\n".join(texts)
        if content is None:
            raise invalid(f"messages[{index}].content is required", f"messages[{index}].content")
        messages.append({"role": ROLE_MAP[message.role], "content": content})
    return messages


def choice_seed(seed: int, choice: int) -> int:
    """seed + choice, wrapped around within int64 (seed 2**63 - 1, choice 1
    must not overflow the IPC)."""
    return (seed + choice - INT64_MIN) % 2**64 + INT64_MIN


def sampling_params(body: ChatCompletionRequest, choice: int) -> SamplingParams:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else choice_seed(body.seed, choice),
        stop=tuple(stop),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
    )


def verify_chat(chat: ChatRequest, body: ChatCompletionRequest, resolution: Resolution, user: str | None,
                settings) -> None:
    """The request types' one validation (pad_core.types, the same the
    engine and the store run), its errors named as the client wrote them."""
    try:
        chat.verify(RequestLimits.from_settings(settings))
    except InvalidRequestError as exc:
        if resolution.source == "profile" and (exc.param or "").startswith("preference"):
            raise APIError(400, f"the preferences stored for user {user!r} cannot be used ({exc.message}); "
                                f"replace them with PUT /v1/users/{{user_id}}/preferences", "invalid_request_error",
                           "user", exc.code) from None
        rename = {}
        if body.max_completion_tokens is not None:
            rename["max_tokens"] = "max_completion_tokens"
        if isinstance(body.preference, str):
            rename["preference[0]"] = "preference"
        raise APIError.from_invalid(exc, rename) from None


# ---- responses ---------------------------------------------------------
def logprobs_json(output: StepOutput) -> list[dict]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": lp.bytes,
            "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in lp.top_logprobs],
        }
        for lp in output.logprobs or []
    ]


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class Completion:
    id: str
    created: int
    model: str
    preferences: list[Preference]
    source: str
    started: float

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def pad_info(self) -> dict:
        return {"preferences": [{"text": p.text, "weight": p.weight} for p in self.preferences], "source": self.source}


def usage_of(choices: list[Choice]) -> dict:
    prompt = choices[0].prompt_tokens if choices else 0
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def engine_failure(output: StepOutput) -> APIError | None:
    if output.finish_reason == "error":
        return APIError(500, output.error or "the engine failed on this request", "server_error", None, "engine_error")
    if output.finish_reason == "abort":
        return unavailable("the request was aborted by the server", "aborted")
    return None


def map_exception(exc: Exception) -> APIError:
    if isinstance(exc, RequestRejected):
        error = exc.error
        status = int(error.get("status") or 400)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return APIError(status, error.get("message", "invalid request"), kind, error.get("param"), error.get("code"))
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "rate_limit_error", None, "queue_full")
    if isinstance(exc, WorkerUnavailable):
        return unavailable(str(exc))
    if isinstance(exc, APIError):
        return exc
    raise exc


class Timing:
    """Time to first token and inter-token latency of one choice."""

    def __init__(self, metrics, started: float):
        self.metrics, self.last = metrics, started
        self.first = True

    def tick(self, output: StepOutput) -> None:
        if not output.token_ids:
            return
        now = time.perf_counter()
        (self.metrics.time_to_first_token if self.first else self.metrics.inter_token_latency).observe(now - self.last)
        self.first, self.last = False, now


# ---- the route ---------------------------------------------------------
class ClientDisconnected(Exception):
    pass


async def _until_disconnected(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
    """Runs `work` (a coroutine); a client that goes away before it is done
    cancels it, which aborts its requests in the worker (the generators'
    cleanup). Covers a non-streaming answer and the wait for a stream's
    first token; once streaming, the response itself watches the client."""
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


# One server-sent event (OpenAPI 3.2's reading of an event stream's schema).
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string", "description": "a chat.completion.chunk (JSON), an OpenAI-shaped error "
                                                  "(JSON) or [DONE]"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
CHAT_RESPONSES = {
    **errors(400, 401, 403, 404, 413, 429, 503),
    200: {
        "model": ChatCompletion,
        "description": "a chat.completion, or with stream: true a text/event-stream of chat.completion.chunk",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    },
}


@router.post("/v1/chat/completions", response_model=None, responses=CHAT_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, scope: Scope):
    state = request.app.state
    metrics = state.metrics
    try:
        response = await _unless_disconnected(request, _chat(body, request, scope))
    except APIError as error:
        metrics.requests.labels(status=str(error.status)).inc()
        raise
    except ClientDisconnected:
        metrics.requests.labels(status="499").inc()
        logger.info("client went away before the answer; its request was aborted")
        return Response(status_code=499)
    if isinstance(response, JSONResponse):
        metrics.requests.labels(status=str(response.status_code)).inc()
    return response


async def _chat(body: ChatCompletionRequest, request: Request, scope):
    state = request.app.state
    settings, client = state.settings, state.worker
    served = client.model_info.get("served_model_name") or settings.resolved_served_name()
    if body.model != served:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{served}'",
                       "invalid_request_error", "model", "model_not_found")
    if body.n > settings.max_queue:  # a 429 that retrying can never cure
        raise invalid(f"n = {body.n} is more than this server ever runs at once (max_queue = {settings.max_queue})",
                      "n")
    refuse_unsupported(body)
    messages = flatten_messages(body)
    user = chat_user(scope, body.user)
    asked = body.preference if "preference" in body.model_fields_set else UNSET
    resolution = await resolve_for_request(getattr(state, "store", None), user, asked)
    pad = body.pad or None
    guidance = GuidanceParams(
        weight=pad.weight if pad else None,
        top_k=pad.top_k if pad else None,
        min_p=pad.min_p if pad else None,
        reward_model=pad.reward_model if pad else "self",
        base_sees_preference=pad.base_sees_preference if pad else None,
    )
    completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served, resolution.preferences,
                            resolution.source, time.perf_counter())
    chats = [
        ChatRequest(f"{completion.id}-{i}", messages, resolution.preferences, sampling_params(body, i), guidance)
        for i in range(body.n)
    ]
    verify_chat(chats[0], body, resolution, user, settings)  # the others differ in the seed alone (choice_seed)
    try:
        client.check_available(needed=body.n)
    except (QueueFull, WorkerUnavailable) as exc:
        raise map_exception(exc) from None
    streams = [client.generate(chat) for chat in chats]
    # The first output of each choice arrives before any byte is sent, so a
    # request the engine refuses still gets a proper 400. The n choices are
    # sent together (they join the batch in the same step).
    try:
        firsts = await asyncio.gather(*(stream.__anext__() for stream in streams), return_exceptions=True)
    except asyncio.CancelledError:
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        raise
    failure = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failure is not None:
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        if isinstance(failure, StopAsyncIteration):
            failure = unavailable("the worker ended the request without an answer")
        raise map_exception(failure) from None
    record = _recorder(state, completion, messages, user)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(completion, streams, firsts, include_usage, state.metrics, record),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    choices = await asyncio.gather(
        *(_collect(i, stream, first, state.metrics, completion.started) for i, (stream, first) in enumerate(zip(streams, firsts)))
    , return_exceptions=True)
    for result in choices:
        if isinstance(result, BaseException):
            raise map_exception(result)
    await record([c.text for c in choices])
    usage = usage_of(choices)
    _count_tokens(state.metrics, usage)
    return JSONResponse(
        {
            "id": completion.id,
            "object": "chat.completion",
            "created": completion.created,
            "model": served,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": c.logprobs} if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage,
            "pad": completion.pad_info(),
        }
    )


def _count_tokens(metrics, usage: dict) -> None:
    metrics.prompt_tokens.inc(usage["prompt_tokens"])
    metrics.generation_tokens.inc(usage["completion_tokens"])


def _recorder(state, completion: Completion, messages, user):
    async def record(answers: list[str]) -> None:
        store = getattr(state, "store", None)
        if store is None:
            return
        try:
            await store.record_completion(completion.id, messages=messages, answers=answers,
                                          preferences=completion.preferences, user=user, model=completion.model,
                                          created=completion.created)
        except Exception:  # feedback memory must never fail an answer
            logger.exception("could not record completion %s for feedback", completion.id)

    return record


async def _outputs(stream: AsyncIterator[StepOutput], first: StepOutput) -> AsyncIterator[StepOutput]:
    yield first
    if not first.finished:
        async for output in stream:
            yield output


async def _collect(index: int, stream, first: StepOutput, metrics, started: float) -> Choice:
    choice, timing = Choice(index), Timing(metrics, started)
    async for output in _outputs(stream, first):
        timing.tick(output)
        failure = engine_failure(output)
        if failure is not None:
            raise failure
        choice.text += output.text
        choice.logprobs += logprobs_json(output)
        choice.prompt_tokens, choice.completion_tokens = output.prompt_tokens, output.completion_tokens
        choice.finish_reason = output.finish_reason
    return choice


async def _merge(streams, firsts) -> AsyncIterator[tuple[int, StepOutput]]:
    """Outputs of all choices as they come (n > 1 interleaves)."""
    if len(streams) == 1:
        async for output in _outputs(streams[0], firsts[0]):
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for output in _outputs(streams[index], firsts[index]):
                await queue.put((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        remaining = len(streams)
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


async def _stream(completion: Completion, streams, firsts, include_usage: bool, metrics, record):
    choices = [Choice(i) for i in range(len(streams))]
    timings = [Timing(metrics, completion.started) for _ in streams]
    yield completion.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for c in choices])
    status = "200"
    try:
        async for index, output in _merge(streams, firsts):
            timings[index].tick(output)
            failure = engine_failure(output)
            if failure is not None:
                raise failure
            choice = choices[index]
            choice.text += output.text
            choice.prompt_tokens, choice.completion_tokens = output.prompt_tokens, output.completion_tokens
            logprobs = logprobs_json(output)
            if output.text or logprobs or output.finish_reason:
                delta = {"content": output.text} if output.text else {}
                yield completion.chunk([{
                    "index": index, "delta": delta,
                    "logprobs": {"content": logprobs} if logprobs else None,
                    "finish_reason": output.finish_reason,
                }])  # fmt: skip
        usage = usage_of(choices)
        _count_tokens(metrics, usage)
        if include_usage:
            yield completion.chunk([], usage)
        await record([c.text for c in choices])
    except (WorkerUnavailable, APIError) as exc:
        error = map_exception(exc)
        status = str(error.status)
        yield f"data: {json.dumps(error.body())}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # the client went away; leaving the streams aborted its requests
        raise
    finally:
        metrics.requests.labels(status=status).inc()
    yield "data: [DONE]\n\n"
