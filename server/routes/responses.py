"""POST /v1/responses (OpenAI's Responses API, text in and out): one
answer, as a `response` object or as OpenAI's stream of typed events
(response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ...,
response.output_text.done, response.content_part.done,
response.output_item.done, then response.completed, or
response.incomplete when max_output_tokens ran out). Function calls come
as function_call items, streamed as OpenAI streams them: a call's
response.output_item.added once its name is written, then
response.function_call_arguments.delta per fragment of its arguments as
the model writes them, then .done and response.output_item.done (see
server/generation.py's CallStream; a call cut by max_output_tokens ends
with response.output_item.done, status "incomplete", and no .done).
`pad` is on the response object, hence on response.created and on the
terminal event too.

A response whose request left `store` true is kept
(server/routes/stored_responses.py): `previous_response_id` continues its
conversation, GET /v1/responses/{id} reads it back, and its items can be
referenced (`item_reference`). `conversation` (server/routes/conversations.py)
reads a kept conversation's items before the input, and adds the input and
the answer's items to it after the answer."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pad_core.types import ChatRequest, SamplingParams
from server import background
from server.auth import Scope, key_scope
from server.auth_scopes import chat_user
from server.errors import APIError, invalid
from server.generation import (
    ChoiceState,
    CallDelta,
    Delta,
    EventStream,
    Formatter,
    Generation,
    check_model,
    logprob_entry,
    recorder,
    sampling_defaults,
    serve,
    stream_events,
    streaming_response,
    usage_of,
    verify_request,
)
from server.messages import response_input_messages
from server.openapi import generation_responses
from server.request_body import JSONRoute
from server.responses_models import ResponseObject, ResponsesRequest
from server.routes.chat import preference_rename, resolve_preferences
from server.routes.conversations import Turn, check_item_ids, conversation_not_found, find_conversation
from server.routes.stored_responses import (
    call_item_id,
    function_call_names,
    keep_response,
    message_item_id,
    not_kept_reason,
    previous_response,
    resolve_item_references,
    stored_input_items,
)
from server.background import Run
from server.background_events import EventLog, frame_of
from server.store.records import StoredConversation, StoredResponse

logger = logging.getLogger(__name__)
router = APIRouter(tags=["responses"], route_class=JSONRoute, dependencies=[Depends(key_scope)])

RESPONSES_RESPONSES = generation_responses(
    ResponseObject, "a response, or with stream: true a text/event-stream of response events")


@router.post("/v1/responses", response_model=None, responses=RESPONSES_RESPONSES)
async def create_response(body: ResponsesRequest, request: Request, scope: Scope):
    return await serve(request, _respond(body, request, scope))


async def _respond(body: ResponsesRequest, request: Request, scope):
    state = request.app.state
    served = check_model(state, body.model)
    body.refuse_unsupported()
    conversation = await continued_conversation(getattr(state, "store", None), scope, body.conversation_id())
    if conversation is None:
        return await _answer(body, state, scope, served, None)
    # One response at a time in a conversation (as OpenAI's conversation_locked):
    # taken before its items are read, so no turn answers on a history another changes.
    turn = await state.conversation_turns.begin(conversation.conversation_id)
    try:
        answer = await _answer(body, state, scope, served, conversation, turn)
    except Exception:
        await turn.end()  # before the client has its error, and may try again
        raise
    except BaseException:
        turn.release()
        raise
    if not isinstance(answer, EventStream) or body.background:
        return answer  # its turn given back once its answer was in the conversation (a background run's: by the run)

    async def release_when_sent() -> None:
        turn.release()

    answer.on_close.append(release_when_sent)  # or when the stream ends otherwise (cut short, failed)
    weakref.finalize(answer, turn.release)  # or is dropped without being sent
    return answer


async def _answer(body: ResponsesRequest, state, scope, served: str, conversation: StoredConversation | None,
                  turn: Turn | None = None):
    """The response to a request whose model is served and whose fields are
    not refused, in `conversation` (None: none), whose `turn` is given back
    once the answer is in it: before the client learns the answer is done."""
    store = getattr(state, "store", None)
    structured = body.to_structured()
    user = chat_user(scope, body.user)
    previous, items, messages = await input_messages(store, scope, body, conversation)
    resolution = await resolve_preferences(state, body, user)
    response_id = f"resp_{uuid.uuid4().hex}"
    sampling = body.to_sampling_params(sampling_defaults(state))
    chat = ChatRequest(f"{response_id}-0", messages, resolution.preferences, sampling,
                       body.to_guidance_params(), structured, drop_oldest_messages=body.truncation == "auto")
    generation = Generation(state, response_id, served, [chat], [ChoiceState.of(0, structured)], resolution)
    rename = {**preference_rename(body), "max_tokens": "max_output_tokens"}
    verify_request(chat, state.settings, resolution, user, rename)
    generation.rename = {**rename, "messages": "input", "response_format": "text.format"}
    record = recorder(state, generation, messages, user)
    keeps = body.store is not False and store is not None and store.keeps_responses
    formatter = ResponsesFormatter(body, response_id, keeps, sampling)
    history = messages[1:] if body.instructions else messages  # instructions do not carry over

    async def keep(response: dict, first: bool = False) -> None:
        """Keeps the response (a background one: first queued, a must, then
        each later state in its place)."""
        if keeps:
            await keep_response(store, response, user=user, history=history, items=items, previous=previous,
                                replace=bool(body.background) and not first, must=first)

    async def finished(choices: list[ChoiceState], response: dict) -> None:
        await record(choices)
        if conversation is not None:
            await turn.end_after(extend_conversation(store, conversation, items, response))
        await keep(response)

    if body.background:
        if not keeps:
            raise invalid(f"background responses cannot be kept to be polled: {not_kept_reason(store)}",
                          "background")
        return await answer_in_background(state, generation, formatter, keep, finished, turn, bool(body.stream))
    await generation.start()
    if body.stream:
        async def stream_finished(choices: list[ChoiceState]) -> None:
            await finished(choices, formatter.final_streamed(generation, usage_of(choices)))

        stream_failed = turn.end if turn is not None else None  # as the answer's: before the client knows
        return streaming_response(stream_events(generation, formatter, stream_finished, stream_failed),
                                  on_close=[generation.close])
    choices = await generation.collect()
    response = formatter.response(generation, choices[0])
    await finished(choices, response)
    return JSONResponse(response)


async def input_messages(store, scope, body: ResponsesRequest, conversation: StoredConversation | None
                         ) -> tuple[StoredResponse | None, str | list[dict[str, Any]], list[dict[str, str]]]:
    """A request's prompt as engine messages: its instructions, then the
    previous response's or the conversation's items, then its own input
    (item references resolved; items joining a conversation may not reuse
    its ids). Also the previous response and the resolved input items."""
    previous = await previous_response(store, scope, body.previous_response_id)
    items = await resolve_item_references(store, scope, body.input if body.input is not None else [])
    if conversation is not None:
        check_item_ids(items, "input")  # they join the conversation
        earlier, call_names = await conversation_messages(store, conversation)
    else:
        earlier, call_names = (previous.conversation, previous.call_names) if previous else ((), None)
    return previous, items, response_input_messages(items, body.instructions, earlier, call_names)


# ---- background responses -------------------------------------------------
# A background response waits this long at most for room in the queue, or
# for a worker that is restarting, before it fails with what it was told.
BACKGROUND_WAIT_S = 600.0
WAITED_OUT = {"queue_full", "worker_unavailable"}  # 429 a full queue, 503 a worker down or stopping


async def start_when_room(generation: Generation) -> None:
    """Generation.start for a background response, which stays `queued`
    while the queue is full or the worker restarts (retried with backoff up
    to BACKGROUND_WAIT_S) instead of failing: the client asked for it to be
    answered when the server can, and had its 200 already."""
    delay, waited = 0.25, 0.0
    while True:
        try:
            await generation.start()
            return
        except APIError as error:
            if error.code not in WAITED_OUT or waited >= BACKGROUND_WAIT_S:
                raise
        await asyncio.sleep(delay)
        waited += delay
        delay = min(2 * delay, 5.0)


async def answer_in_background(state, generation: Generation, formatter: ResponsesFormatter,
                               keep: Callable[..., Awaitable[None]],
                               finished: Callable[[list[ChoiceState], dict], Awaitable[None]],
                               turn: Turn | None, stream: bool) -> JSONResponse | EventStream:
    """Keeps the response `queued` and answers it in a task of this gateway
    (server/background.py), which stores each later state. The request is
    answered at once: with the queued response, or (`stream`) with the
    run's events as they come (response.created and response.queued first),
    which are kept to be read again (server/background_events.py); a client
    that goes away leaves the run going."""
    queued = formatter.envelope(generation, "queued", [], None)
    await keep(queued, first=True)
    log = EventLog(state.store, generation.id) if stream else None

    def publish(frames: list[str]) -> None:
        if log is not None:
            log.append(frames)

    async def stream_finished(choices: list[ChoiceState]) -> None:
        await finished(choices, formatter.final_streamed(generation, usage_of(choices)))

    async def work(run: Run) -> None:
        try:
            await start_when_room(generation)
            await keep(formatter.envelope(generation, "in_progress", [], None))
            if log is None:
                choices = await generation.collect()
                await finished(choices, formatter.response(generation, choices[0]))
                return
            formatter.announced = True  # created and queued were sent: the stream opens with in_progress
            async for frame in stream_events(generation, formatter, stream_finished, count_status=False):
                log.append([frame])
            if formatter.failed_response is not None:  # the engine failed mid-answer: the stream ended with it
                await keep(formatter.failed_response)
        except APIError as error:
            await generation.close(None)
            publish(formatter.error(generation, error))
            await keep(formatter.failed_response)
        except asyncio.CancelledError:
            await asyncio.shield(generation.close())  # the worker aborts what still runs
            ended = formatter.envelope(generation, "cancelled", [], None)
            if run.stop_reason != "cancelled":  # the gateway stops: the answer will not come
                ended = background.failed(ended)
                publish([formatter.event("response.failed", response=ended)])
            # cancelled: the stream just ends (OpenAI has no event for it); GET says cancelled
            await asyncio.shield(keep(ended))
            raise
        except Exception:
            logger.exception("background response %s failed", generation.id)
            await generation.close("error")
            ended = background.failed(formatter.envelope(generation, "failed", [], None),
                                      {"code": "server_error", "message": "The server failed to answer."})
            publish([formatter.event("response.failed", response=ended)])
            await keep(ended)
        finally:
            if turn is not None:
                await asyncio.shield(turn.end())  # ended already when the answer joined its conversation
            if log is not None:
                await asyncio.shield(log.close())  # every event written before the run gives up its lease

    if log is None:
        await state.background_responses.start(generation.id, work)
        return JSONResponse(queued)
    publish([formatter.event("response.created", response=queued),
             formatter.event("response.queued", response=queued)])
    # Written before the run starts (nobody knows the id yet): once it has started, the run holds
    # the conversation's turn, and nothing here may fail or wait on the client any more.
    await log.flush()
    await state.background_responses.start(generation.id, work, log)
    return streaming_response(log.follow(), counts_itself=False)


# ---- conversations -------------------------------------------------------
async def continued_conversation(store, scope, conversation_id: str | None) -> StoredConversation | None:
    """The conversation a request continues (`conversation`), or a 404."""
    if conversation_id is None:
        return None
    found = await find_conversation(store, scope, conversation_id)
    if found is None:
        raise conversation_not_found(conversation_id, "conversation")
    return found


async def conversation_messages(store, conversation: StoredConversation) -> tuple[list[dict[str, str]], dict[str, str]]:
    """A conversation's items as the messages that go before the input, and
    the names of the function calls among them (call_id -> name)."""
    items, _ = await store.conversation_items(conversation.conversation_id)
    if not any(item.get("type", "message") != "reasoning" for item in items):  # nothing a model reads
        return [], {}
    return response_input_messages(items, None, param="conversation"), function_call_names(items)


async def extend_conversation(store, conversation: StoredConversation, items: str | list[dict[str, Any]],
                              response: dict[str, Any]) -> None:
    """Adds a request's input and its answer's items to its conversation,
    once answered (before the terminal event of a stream). A store that
    fails is logged, never the answer's failure (as keeping a response)."""
    try:
        await store.add_conversation_items(conversation.conversation_id,
                                           stored_input_items(items) + list(response["output"]))
    except Exception:
        logger.exception("could not add response %s to conversation %s", response.get("id"),
                         conversation.conversation_id)


def responses_usage(usage: dict) -> dict:
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


class ResponsesFormatter(Formatter):
    def __init__(self, body: ResponsesRequest, response_id: str, stored: bool, sampling: SamplingParams):
        self.body = body
        self.sampling = sampling  # what it samples with: its own values, else the model's defaults
        self.stored = stored  # kept for previous_response_id and GET
        self.sequence = 0
        self.response_id = response_id
        self.conversation_id = body.conversation_id()
        self.message_id = message_item_id(response_id)
        self.message_open = False
        self.announced = False  # response.created sent already (a background stream's, as it was queued)
        self.failed_response: dict | None = None  # the response a failed stream ended with

    # ---- the objects ----------------------------------------------------
    def envelope(self, generation: Generation, status: str, output: list[dict], usage: dict | None) -> dict:
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        text_format = (body.text.format if body.text else None) or {"type": "text"}
        return {
            "id": generation.id, "object": "response", "created_at": generation.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,  # OpenAI's: only once completed
            "background": bool(body.background), "error": None, "incomplete_details": incomplete,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": body.max_tool_calls, "model": generation.model, "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "conversation": {"id": self.conversation_id} if self.conversation_id is not None else None,
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            "store": self.stored,
            "temperature": self.sampling.temperature,
            "text": {"format": text_format, "verbosity": (body.text.verbosity if body.text else None) or "medium"},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",  # OpenAI's default, tools or not
            "tools": body.tools or [], "top_logprobs": body.top_logprobs or 0,
            "top_p": self.sampling.top_p, "truncation": body.truncation or "disabled",
            "usage": responses_usage(usage) if usage is not None else None, "user": body.user,
            "metadata": body.metadata or {}, "safety_identifier": body.safety_identifier,
            "prompt_cache_key": body.prompt_cache_key, "pad": generation.pad_info(),
        }

    def text_part(self, text: str, logprobs: list | None = None) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def message_item(self, choice: ChoiceState, status: str) -> dict:
        content = [self.text_part(choice.text, [logprob_entry(lp) for lp in choice.logprobs])] if status != "in_progress" else []
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def call_item(self, call: dict, index: int, status: str = "completed") -> dict:
        """The function_call item of the answer's index-th OpenAI-shaped call."""
        return {"id": call_item_id(self.response_id, index), "type": "function_call", "status": status,
                "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]}

    @staticmethod
    def status(choice: ChoiceState) -> str:
        return "incomplete" if choice.finish_reason == "length" else "completed"

    def output(self, choice: ChoiceState) -> list[dict]:
        calls = choice.answer_calls  # cut short (max_output_tokens, a stop): those begun, as a stream gives them
        if calls is None:
            return [self.message_item(choice, self.status(choice))]
        whole = choice.tool_calls is not None
        return [self.call_item(call, index, "completed" if whole or index < choice.calls_complete else "incomplete")
                for index, call in enumerate(calls)]

    def response(self, generation: Generation, choice: ChoiceState) -> dict:
        return self.envelope(generation, self.status(choice), self.output(choice), usage_of([choice]))

    # ---- the events -----------------------------------------------------
    def event(self, kind: str, **data: Any) -> str:
        frame = frame_of(kind, self.sequence, **data)
        self.sequence += 1
        return frame

    def opening(self, generation: Generation) -> list[str]:
        envelope = self.envelope(generation, "in_progress", [], None)
        if self.announced:  # a background stream: created and queued were sent as it was queued
            return [self.event("response.in_progress", response=envelope)]
        return [self.event("response.created", response=envelope), self.event("response.in_progress", response=envelope)]

    def open_message(self, choice: ChoiceState) -> list[str]:
        if self.message_open:
            return []
        self.message_open = True
        return [
            self.event("response.output_item.added", output_index=0, item=self.message_item(choice, "in_progress")),
            self.event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                       part=self.text_part("")),
        ]

    def call_events(self, choice: ChoiceState, call: CallDelta) -> list[str]:
        """One call delta's events: the item added (its announcement), an
        arguments fragment, or its arguments and item done."""
        item = self.call_item(choice.streamed_calls[call.index], call.index, "in_progress")
        if call.name is not None:  # its arguments follow in deltas (the record may hold some already)
            return [self.event("response.output_item.added", output_index=call.index, item={**item, "arguments": ""})]
        if not call.done:
            return [self.event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=call.index, delta=call.arguments)]
        return [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=call.index,
                           name=item["name"], arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=call.index, item={**item, "status": "completed"})]

    def unfinished_calls(self, choice: ChoiceState) -> list[str]:
        """The calls an answer cut short left open: each item done, "incomplete"
        (no arguments .done: they are not)."""
        return [self.event("response.output_item.done", output_index=index,
                           item=self.call_item(call, index, "incomplete"))
                for index, call in enumerate(choice.streamed_calls) if index >= choice.calls_complete]

    def delta(self, generation: Generation, choice: ChoiceState, delta: Delta) -> list[str]:
        if choice.streamed_calls or choice.holds_calls:  # the answer is calls: no message item
            events = [event for call in delta.calls for event in self.call_events(choice, call)]
            return events + (self.unfinished_calls(choice) if delta.finish_reason is not None else [])
        events = self.open_message(choice)
        if delta.text:
            events.append(self.event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                     content_index=0, delta=delta.text,
                                     logprobs=[logprob_entry(lp) for lp in delta.logprobs]))
        if delta.finish_reason is not None:
            part = self.text_part(choice.text, [logprob_entry(lp) for lp in choice.logprobs])
            events += [
                self.event("response.output_text.done", item_id=self.message_id, output_index=0, content_index=0,
                           text=choice.text, logprobs=part["logprobs"]),
                self.event("response.content_part.done", item_id=self.message_id, output_index=0, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=0,
                           item=self.message_item(choice, self.status(choice))),
            ]
        return events

    def final_streamed(self, generation: Generation, usage: dict) -> dict:
        """The response a stream ends with (its terminal event's)."""
        choice = generation.choices[0]
        status = self.status(choice) if choice.tool_calls is None else "completed"
        return self.envelope(generation, status, self.output(choice), usage)

    def closing(self, generation: Generation, usage: dict) -> list[str]:
        response = self.final_streamed(generation, usage)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [self.event(kind, response=response)]

    def error(self, generation: Generation, error: APIError) -> list[str]:
        """The error event, then the terminal response.failed (as OpenAI ends
        a failed stream): a client waiting for a terminal event gets one."""
        code = error.code or error.type
        failed = {**self.envelope(generation, "failed", [], None), "error": {"code": code, "message": error.message}}
        self.failed_response = failed
        return [self.event("error", code=code, message=error.message, param=error.param),
                self.event("response.failed", response=failed)]

    def done(self) -> list[str]:
        return []  # the Responses stream ends with its terminal event, no [DONE]
