"""Soak test: a running PAD server under a mixed load for a while, with its
invariants checked, the way one checks a server before production.

    .venv/bin/python -m benchmarks.soak --base-url http://127.0.0.1:8000 --duration 600 \
        [--concurrency 5] [--kill-worker-after 120] [--answers-out answers.jsonl]

It talks to the server over HTTP only (httpx, asyncio) and reads its
processes with psutil; it imports nothing of the server. The load, drawn at
random (seeded, after one round of every scenario) by --concurrency clients:

  chat completions, streamed and not, plain and with `preference` (and `pad`
  settings), `n: 2`, stop strings, logprobs, short and long prompts (some
  not ASCII), `max_tokens` 1..64; `/v1/completions` (streamed and not);
  `/v1/responses` streamed; a json_schema structured output now and then,
  and vLLM's constraints (choice, regex, GBNF grammar; chat and completions)
  and prefilled answers (continue_final_message with echo);
  a tool with tool_choice "auto" (calls or text, each well-formed);
  conversations of 2-4 turns sending the model's own answers back (the
  prefix cache's load); clients that hang up mid-stream and mid-prefill;
  invalid requests. And the stateful APIs: chains of kept responses
  (previous_response_id), read back, listed, deleted, and store false;
  conversations (the Conversations API and `conversation` on
  /v1/responses, streamed and not) of 2-3 turns, with an item or the
  conversation deleted now and then; two responses sent at once in one
  conversation; a client that hangs up mid-stream in one; a conversation
  deleted while a response in it streams; a user's preference profile
  (PUT, PATCH, GET, DELETE) used by chats naming the user, and feedback on
  those answers. And Anthropic's Messages API (`/v1/messages`, streamed and
  not, with preferences and stop sequences).

Checked and printed at the end (exit status 1 if any fails):

  - no 5xx and no transport error (except, with --kill-worker-after, 503s
    and stream error events of the requests the kill reached);
  - every answer has finish_reason in {stop, length, tool_calls}, usage that
    adds up (total = prompt + completion; completion = max_tokens per
    choice cut by length, at most max_tokens otherwise; a streamed answer's
    final usage equals its chunks': one logprob entry per token, no more
    content chunks than tokens, continuous usage never going back), with
    logprobs a streamed text that is exactly its tokens' bytes decoded (no
    character cut in half or doubled at a chunk boundary), no stop string
    in the text, a json_schema answer that parses, Responses events
    numbered in order ending in response.completed / .incomplete (answers
    holding U+FFFD, byte tokens the model wrote that make no character,
    are counted);
  - every invalid request is a 4xx with an OpenAI-shaped error body;
  - an Anthropic message has one text block, a stop_reason that fits its
    output tokens (max_tokens exactly max_tokens), the stop sequence it
    names (one of the request's) out of its text, and a stream has its
    events in order (message_start ... message_delta, message_stop) whose
    text deltas make the text checked; an error it gets (a 429 under
    load) is Anthropic-shaped;
  - the stateful APIs: a kept response read back (GET) is what was
    returned, its input_items are its own input, a deleted one (or one of
    store false) is a 404 response_not_found; a conversation's items
    (listed oldest first, in one page or in pages following `after`) are
    exactly the items it held, then each turn's input directly followed by
    its own answer (the response's output items as returned), in order,
    each turn reading more tokens than the one before; two responses at
    once in one conversation are both answered, or one is answered and the
    other a 400 conversation_locked; after a client hangs up mid-stream the
    conversation takes a turn again within LOCK_RETRY_S and the turn hung
    up on added nothing; a conversation deleted mid-stream ends that stream
    cleanly or with an error event then response.failed, and is then a 404
    conversation_not_found; a profile's PUT / PATCH / GET / DELETE answer
    the preferences expected, a chat naming the user and no preference runs
    with them (pad.source "profile"), feedback records what was sent; each
    expected error an OpenAI-shaped body with its code;
  - after the load, with the server idle, the /metrics gauges of requests
    in flight, queue depth, running requests and running rows return to 0;
  - with --kill-worker-after: the worker is SIGKILLed mid-load, the requests
    in flight end (503 or a stream error event) within --hang-limit seconds,
    /health goes back to 200 and answers succeed again.

Reported: the RSS of the gateway and the worker over time (growth per
1,000 requests, by least squares after a warm-up, and the RSS once idle
after the load: the worker trims its heap then, so a rise there from run
to run is what a leak looks like), p50/p99 latency and time to first
token, tokens/s, and the requests by status as the client saw them and as
the server's pad_requests_total counted them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx
import psutil
import regex  # partial matching (a cut answer is a prefix of a match); transformers depends on it

FINISH_REASONS = {"stop", "length", "tool_calls"}
GAUGES = ("pad_requests_in_flight", "pad_queue_depth", "pad_running_requests", "pad_running_rows")

SHORT_PROMPTS = [
    "How do I sleep better?",
    "What is a good way to save money each month?",
    "Explain how a rainbow forms.",
    "Give me three tips for my first job interview.",
    "How do I make a simple tomato sauce?",
    "Why do cats purr?",
    "What should I pack for a weekend hiking trip?",
    "How can I stay focused while studying?",
    "What is the difference between weather and climate?",
    "How do I keep my houseplants alive?",
    "Write a haiku about the sea.",
    "Qu'est-ce qu'un arc-en-ciel ? Réponds en une phrase.",
    "Translate 'good morning' into Spanish, German and Japanese.",
    "List five fruits with an emoji for each.",
    "What is 17 times 3?",
    "Name the planets of the solar system.",
]
PARAGRAPH = (
    "The city council met on Tuesday to discuss the new public library. Residents asked for longer opening "
    "hours, a larger children's section and quiet rooms for studying. The architect presented two designs: "
    "one with a glass roof and a garden, the other with solar panels and a café. Several speakers worried "
    "about the cost, which the mayor estimated at twelve million euros, and about parking on market days. "
)
LONG_QUESTIONS = [
    "Summarize the text above in one sentence.",
    "What did the residents ask for?",
    "Which design would you choose, and why?",
]
PREFERENCES = [
    "I like short answers with a bit of humour",
    "Please format your answers as a bulleted list",
    "Always end your answer with a question for me",
    "I prefer formal, precise language",
]
STOPS = ["\n\n", ".", "!", " and ", "2."]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

# PERSON_SCHEMA's objects as text, for a cut answer's prefix check (either
# property order; JSON whitespace between tokens).
_STRING, _INTEGER = r'"(?:[^"\\\x00-\x1f]|\\.)*"', r"-?(?:0|[1-9][0-9]*)"
_NAME, _AGE = rf'"name"\s*:\s*{_STRING}', rf'"age"\s*:\s*{_INTEGER}'
PERSON_JSON = rf"\s*\{{\s*(?:{_NAME}\s*,\s*{_AGE}|{_AGE}\s*,\s*{_NAME})\s*\}}\s*"


# ---- what one request did ----------------------------------------------
@dataclass
class Outcome:
    scenario: str
    started: float  # seconds since the load began
    ended: float = 0.0
    status: int | None = None  # HTTP status; None: no response (transport error, cancelled)
    answered: bool = False  # a complete answer came back
    cancelled: bool = False  # we hung up on purpose
    expected_4xx: bool = False  # an invalid request we sent on purpose
    stream_error: dict | None = None  # an error event inside a 200 stream
    transport_error: str | None = None
    ttft: float | None = None
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    replacement_chars: int = 0  # U+FFFD in the answers (invalid UTF-8 the model wrote)
    request: dict = field(default_factory=dict)

    @property
    def latency(self) -> float:
        return self.ended - self.started

    def fail(self, message: str) -> None:
        self.violations.append(message)


@dataclass
class Context:
    client: httpx.AsyncClient
    model: str
    rng: random.Random
    t0: float
    max_tokens_cap: int = 64

    def now(self) -> float:
        return time.monotonic() - self.t0


# ---- request bodies ----------------------------------------------------
def long_prompt(rng: random.Random) -> str:
    return PARAGRAPH * rng.randint(4, 12) + "\n" + rng.choice(LONG_QUESTIONS)


def a_prompt(rng: random.Random, long_share: float = 0.2) -> str:
    return long_prompt(rng) if rng.random() < long_share else rng.choice(SHORT_PROMPTS)


def personalise(body: dict, rng: random.Random) -> None:
    """Adds a preference (one or two) and, sometimes, PAD settings."""
    roll = rng.random()
    if roll < 0.4:
        return
    if roll < 0.85:
        body["preference"] = rng.choice(PREFERENCES)
    else:
        body["preference"] = [{"text": p, "weight": rng.choice([0.5, 1.0])} for p in rng.sample(PREFERENCES, 2)]
    if rng.random() < 0.5:
        body["pad"] = {"weight": rng.choice([0.0, 1.0, 2.0, 4.0]), "top_k": rng.choice([10, 40, 80]),
                       "min_p": rng.choice([0.0, 0.1])}


def sampling(body: dict, rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.3:
        body["temperature"] = 0
    elif roll < 0.8:
        body["temperature"] = rng.choice([0.3, 0.7])
        body["seed"] = rng.randint(0, 2**31)
    # else: the default temperature (1.0)


def chat_body(ctx: Context, stream: bool) -> dict:
    rng = ctx.rng
    body: dict = {"model": ctx.model, "max_tokens": rng.randint(1, ctx.max_tokens_cap),
                  "messages": [{"role": "user", "content": a_prompt(rng)}]}
    if rng.random() < 0.2:
        body["messages"].insert(0, {"role": "system", "content": "You are a helpful assistant."})
    personalise(body, rng)
    sampling(body, rng)
    if rng.random() < 0.15:
        body["n"] = 2
    if rng.random() < 0.2:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    elif stream and rng.random() < 0.5:
        body["logprobs"] = True  # one entry per token: counts the tokens of a stream
        body["top_logprobs"] = rng.randint(0, 3)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.3:
            body["stream_options"]["continuous_usage_stats"] = True
    return body


# ---- checks ------------------------------------------------------------
def check_text(out: Outcome, text: str, body: dict) -> None:
    """No stop string in the answer. A U+FFFD is noted, not failed: the model
    may sample a byte token that starts a character and then one that does
    not finish it (the streams with logprobs check the bytes exactly)."""
    if "\ufffd" in text:
        out.replacement_chars += text.count("\ufffd")
    stops = body.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop in text:
            out.fail(f"stop string {stop!r} in the answer")


def check_bytes(out: Outcome, text: str, pieces: list[bytes], reason: str | None) -> None:
    """The streamed text is its tokens' bytes decoded (invalid UTF-8 the
    model wrote as U+FFFD, as a whole-answer decode gives it): no character
    lost or doubled at a chunk boundary, none held back at the end (an
    answer cut inside a character ends in U+FFFD, as its whole decode). An
    answer that stopped on end-of-sequence has that token's bytes last, not
    in the text."""
    whole = b"".join(pieces).decode("utf-8", "replace")
    before_eos = b"".join(pieces[:-1]).decode("utf-8", "replace")
    if text != whole and not (reason == "stop" and text == before_eos):
        out.fail(f"streamed text {text[-30:]!r} is not its tokens' bytes decoded {whole[-30:]!r}")


def check_finish(out: Outcome, reasons: list[str | None], expected_choices: int) -> None:
    if len(reasons) != expected_choices:
        out.fail(f"{len(reasons)} finish reasons for {expected_choices} choices")
    for reason in reasons:
        if reason not in FINISH_REASONS:
            out.fail(f"finish_reason {reason!r}")


def check_usage(out: Outcome, usage: dict | None, reasons: list[str], max_tokens: int,
                prompt_key: str = "prompt_tokens", completion_key: str = "completion_tokens") -> None:
    """total = prompt + completion; a choice cut by length has max_tokens
    tokens; none has more."""
    if not usage:
        out.fail("no usage")
        return
    prompt, completion = usage.get(prompt_key), usage.get(completion_key)
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 1:
        out.fail(f"usage malformed: {usage}")
        return
    if usage.get("total_tokens") != prompt + completion:
        out.fail(f"usage total {usage.get('total_tokens')} != {prompt} + {completion}")
    cut = sum(1 for r in reasons if r == "length")
    if completion > max_tokens * len(reasons) or completion < max_tokens * cut:
        out.fail(f"completion_tokens {completion} for {len(reasons)} choices ({cut} cut by length) "
                 f"at max_tokens {max_tokens}")
    if cut == len(reasons) and completion != max_tokens * cut:
        out.fail(f"every choice cut by length but completion_tokens {completion} != {max_tokens} x {cut}")
    out.completion_tokens = completion


def check_error_body(out: Outcome, response: httpx.Response) -> dict | None:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        out.fail(f"{response.status_code} without an OpenAI error body: {response.text[:120]!r}")
        return None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or "type" not in error \
            or "param" not in error or "code" not in error:
        out.fail(f"{response.status_code} error body not OpenAI-shaped: {error!r}")
    return error


def record_status(out: Outcome, response: httpx.Response) -> bool:
    """The status; True when it is a 200 to read on."""
    out.status = response.status_code
    if response.status_code != 200:
        check_error_body(out, response)
        return False
    return True


async def stream_status(out: Outcome, response: httpx.Response) -> bool:
    """record_status for a streamed request (an error body is read first)."""
    if response.status_code != 200:
        await response.aread()
    return record_status(out, response)


# ---- streams -------------------------------------------------------------
async def sse_events(response: httpx.Response):
    """(event name or None, data) of each SSE event."""
    name, data = None, []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and data:
            yield name, "\n".join(data)
            name, data = None, []
    if data:
        yield name, "\n".join(data)


@dataclass
class ChunkStream:
    """The state of a chat / text completion stream, choice by choice."""

    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    content_chunks: int = 0
    logprob_entries: int = 0
    token_bytes: dict[int, list[bytes]] = field(default_factory=dict)  # chat logprobs: each token's bytes
    usage: dict | None = None
    last_running_usage: int = -1
    done: bool = False
    error: dict | None = None

    def feed(self, out: Outcome, data: dict, chat: bool) -> None:
        if "error" in data:
            self.error = data["error"]
            return
        usage = data.get("usage")
        if usage:
            if usage["completion_tokens"] < self.last_running_usage:
                out.fail("continuous usage went back")
            self.last_running_usage = usage["completion_tokens"]
            if not data.get("choices"):
                self.usage = usage
        for choice in data.get("choices", []):
            index = choice["index"]
            if index in self.finish:
                out.fail(f"choice {index} has a chunk after its finish_reason")
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                self.content_chunks += 1
                self.texts[index] = self.texts.get(index, "") + text
            logprobs = choice.get("logprobs")
            if logprobs and chat:
                entries = logprobs.get("content") or []
                self.logprob_entries += len(entries)
                self.token_bytes.setdefault(index, []).extend(bytes(e["bytes"]) for e in entries)
            elif logprobs:
                self.logprob_entries += len(logprobs.get("tokens") or [])
            if choice.get("finish_reason"):
                self.finish[index] = choice["finish_reason"]


async def read_chunk_stream(ctx: Context, out: Outcome, response: httpx.Response, chat: bool,
                            stop_after: int | None = None) -> ChunkStream | None:
    """Reads a stream to its [DONE] (or `stop_after` chunks: a client that
    hangs up). None when it was cut on purpose."""
    state = ChunkStream()
    chunks = 0
    async for _, raw in sse_events(response):
        if raw == "[DONE]":
            state.done = True
            break
        if state.done:
            out.fail("data after [DONE]")
        if out.ttft is None:
            out.ttft = ctx.now() - out.started
        state.feed(out, json.loads(raw), chat)
        chunks += 1
        if stop_after is not None and chunks >= stop_after:
            out.cancelled = True
            return None
    return state


def check_chunk_stream(out: Outcome, state: ChunkStream, body: dict, choices: int) -> None:
    if state.error is not None:
        out.stream_error = state.error
        if not isinstance(state.error.get("message"), str):
            out.fail(f"stream error event not OpenAI-shaped: {state.error}")
        return
    if not state.done:
        out.fail("stream ended without [DONE]")
    reasons = [state.finish.get(i) for i in range(choices)]
    check_finish(out, reasons, choices)
    check_usage(out, state.usage, reasons, body["max_tokens"])
    tokens = (state.usage or {}).get("completion_tokens", 0)
    if state.content_chunks > tokens:
        out.fail(f"{state.content_chunks} content chunks for {tokens} tokens")
    if body.get("logprobs") and state.logprob_entries != tokens:
        out.fail(f"{state.logprob_entries} logprob entries for {tokens} tokens")
    if state.last_running_usage >= 0 and state.last_running_usage != tokens:
        out.fail(f"continuous usage ended at {state.last_running_usage}, final usage says {tokens}")
    out.texts = [state.texts.get(i, "") for i in range(choices)]
    for text in out.texts:
        check_text(out, text, body)
    for index, pieces in state.token_bytes.items():
        check_bytes(out, out.texts[index], pieces, reasons[index])
    out.finish_reasons = [r or "?" for r in reasons]
    out.answered = not out.violations


def check_answer(out: Outcome, data: dict, body: dict, n: int, text_of) -> list[dict]:
    """The checks every non-streamed answer gets (finish reasons, usage, the
    text of each choice, read by `text_of`); returns its choices."""
    choices = data.get("choices", [])
    reasons = [c.get("finish_reason") for c in choices]
    check_finish(out, reasons, n)
    check_usage(out, data.get("usage"), reasons, body["max_tokens"])
    out.texts = [text_of(c) or "" for c in choices]
    for text in out.texts:
        check_text(out, text, body)
    out.finish_reasons = reasons
    return choices


# ---- scenarios -----------------------------------------------------------
async def chat_plain(ctx: Context, out: Outcome) -> None:
    body = out.request = chat_body(ctx, stream=False)
    response = await ctx.client.post("/v1/chat/completions", json=body)
    if not record_status(out, response):
        return
    data = response.json()
    check_answer(out, data, body, body.get("n", 1), lambda choice: choice["message"]["content"])
    if body.get("preference") is not None and data.get("pad", {}).get("source") != "request":
        out.fail(f"pad.source {data.get('pad')}")
    out.answered = not out.violations


async def chat_stream(ctx: Context, out: Outcome) -> None:
    body = out.request = chat_body(ctx, stream=True)
    async with ctx.client.stream("POST", "/v1/chat/completions", json=body) as response:
        if not await stream_status(out, response):
            return
        state = await read_chunk_stream(ctx, out, response, chat=True)
    check_chunk_stream(out, state, body, body.get("n", 1))


async def text_completion(ctx: Context, out: Outcome) -> None:
    rng = ctx.rng
    stream = rng.random() < 0.5
    body = out.request = {"model": ctx.model, "prompt": rng.choice(["The capital of France is", "Once upon a time,",
                                                                    "A recipe for pancakes:\n1.", long_prompt(rng)]),
                          "max_tokens": rng.randint(1, ctx.max_tokens_cap)}
    personalise(body, rng)
    sampling(body, rng)
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 2)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        async with ctx.client.stream("POST", "/v1/completions", json=body) as response:
            if not await stream_status(out, response):
                return
            state = await read_chunk_stream(ctx, out, response, chat=False)
        check_chunk_stream(out, state, body, 1)
        return
    response = await ctx.client.post("/v1/completions", json=body)
    if not record_status(out, response):
        return
    data = response.json()
    choices = check_answer(out, data, body, 1, lambda choice: choice.get("text"))
    if body.get("logprobs") is not None and choices:
        tokens = len((choices[0].get("logprobs") or {}).get("tokens") or [])
        if tokens != out.completion_tokens:
            out.fail(f"{tokens} logprob tokens for {out.completion_tokens} completion tokens")
    out.answered = not out.violations


async def responses_stream(ctx: Context, out: Outcome) -> None:
    rng = ctx.rng
    body = out.request = {"model": ctx.model, "input": a_prompt(rng), "stream": True,
                          "max_output_tokens": rng.randint(1, ctx.max_tokens_cap)}
    if rng.random() < 0.3:
        body["instructions"] = "Answer briefly."
    personalise(body, rng)
    if rng.random() < 0.5:
        body["temperature"] = rng.choice([0, 0.7])
    async with ctx.client.stream("POST", "/v1/responses", json=body) as response:
        if not await stream_status(out, response):
            return
        events = []
        async for name, raw in sse_events(response):
            if out.ttft is None:
                out.ttft = ctx.now() - out.started
            events.append((name, json.loads(raw)))
    check_responses_events(out, events, body)


def check_responses_events(out: Outcome, events: list[tuple[str | None, dict]], body: dict) -> None:
    if read_responses_events(out, events, body) is not None:
        out.answered = not out.violations


def read_responses_events(out: Outcome, events: list[tuple[str | None, dict]], body: dict,
                          error_ok: bool = False) -> dict | None:
    """Checks a Responses stream: events numbered in order, from
    response.created to response.completed / .incomplete, whose response
    (check_response_object) holds the text of the deltas. Returns that final
    response; None when the stream is broken or ended in an error event (then
    response.failed, as OpenAI ends a failed stream; recorded as
    out.stream_error unless `error_ok`: an error the scenario allows)."""
    if not events:
        out.fail("empty Responses stream")
        return None
    for number, (name, data) in enumerate(events):
        if data.get("sequence_number") != number or data.get("type") != name:
            out.fail(f"event {number}: {name} / {data.get('type')} numbered {data.get('sequence_number')}")
            return None
    names = [name for name, _ in events]
    if "error" in names:
        at = names.index("error")
        error = events[at][1]
        if not isinstance(error.get("message"), str) or "code" not in error:
            out.fail(f"error event not OpenAI-shaped: {error}")
        if names[at + 1:] not in ([], ["response.failed"]):
            out.fail(f"after the error event: {names[at + 1:]}")
        if not error_ok:
            out.stream_error = error
        return None
    if names[0] != "response.created" or names[-1] not in ("response.completed", "response.incomplete"):
        out.fail(f"Responses stream from {names[0]} to {names[-1]}")
        return None
    final = events[-1][1]["response"]
    if final.get("status") != names[-1].removeprefix("response."):
        out.fail(f"{names[-1]} with a response {final.get('status')!r}")
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    done = [d["text"] for n, d in events if n == "response.output_text.done"]
    if done and done[0] != deltas:
        out.fail("output_text.done differs from the deltas")
    texts = [part["text"] for item in final.get("output", []) if item.get("type") == "message"
             for part in item.get("content", [])]
    if texts != [deltas]:
        out.fail("the final response's text differs from the deltas")
    return final if check_response_object(out, final, body) is not None else None


def message_text(item: dict) -> str:
    """A message item's text: its content when a string, else its parts' text."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or () if isinstance(part, dict))


def response_text(response: dict) -> str:
    """A Responses answer's text (its message items')."""
    return "".join(message_text(item) for item in response.get("output") or () if item.get("type") == "message")


def check_response_object(out: Outcome, data: dict, body: dict) -> str | None:
    """A Responses answer (an answer or a stream's final response): status
    completed, or incomplete by max_output_tokens; its output one assistant
    message; usage adding up (check_usage); its text (check_text). Adds its
    text, finish reason and tokens to `out`; returns the text (None when
    the answer is malformed)."""
    status, output = data.get("status"), data.get("output") or []
    if status not in ("completed", "incomplete"):
        out.fail(f"response {data.get('id')} has status {status!r}")
        return None
    if status == "incomplete" and (data.get("incomplete_details") or {}).get("reason") != "max_output_tokens":
        out.fail(f"incomplete response with incomplete_details {data.get('incomplete_details')}")
    if len(output) != 1 or output[0].get("type") != "message" or output[0].get("role") != "assistant":
        out.fail(f"response output is not one assistant message: {str(output)[:200]}")
        return None
    reason = "length" if status == "incomplete" else "stop"
    text = response_text(data)
    tokens, out.completion_tokens = out.completion_tokens, 0
    check_usage(out, data.get("usage"), [reason], body["max_output_tokens"], "input_tokens", "output_tokens")
    out.completion_tokens += tokens
    check_text(out, text, body)
    out.texts.append(text)
    out.finish_reasons.append(reason)
    return text


async def post_one_choice(ctx: Context, out: Outcome, body: dict) -> tuple[dict, list[str | None]] | None:
    """A non-streamed chat of one choice, its status recorded and its finish
    reason and usage checked (a "tool_calls" finish counts as "stop"):
    (the choice, its finish reasons), or None when it was refused."""
    response = await ctx.client.post("/v1/chat/completions", json=body)
    if not record_status(out, response):
        return None
    data = response.json()
    choice = data["choices"][0]
    reasons = [choice.get("finish_reason")]
    ended = ["stop" if reason == "tool_calls" else reason for reason in reasons]
    check_finish(out, ended, 1)
    check_usage(out, data.get("usage"), ended, body["max_tokens"])
    return choice, reasons


async def structured_output(ctx: Context, out: Outcome) -> None:
    rng = ctx.rng
    body = out.request = {"model": ctx.model, "max_tokens": 64, "temperature": rng.choice([0, 0.7]),
                          "messages": [{"role": "user", "content": "Invent a person: give a name and an age as JSON."}],
                          "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "person", "strict": True, "schema": PERSON_SCHEMA}}}
    personalise(body, rng)
    answered = await post_one_choice(ctx, out, body)
    if answered is None:
        return
    choice, reasons = answered
    text = choice["message"]["content"] or ""
    check_text(out, text, body)
    if reasons[0] == "stop":
        try:
            value = json.loads(text)
            if set(value) != {"name", "age"} or not isinstance(value["age"], int):
                out.fail(f"json_schema answer off schema: {text!r}")
        except ValueError:
            out.fail(f"json_schema answer is not JSON: {text!r}")
    elif not follows(PERSON_JSON, text, reasons[0]):  # cut by max_tokens: a prefix of such an object
        out.fail(f"cut json_schema answer is no prefix of a person object: {text!r}")
    out.texts, out.finish_reasons = [text], reasons
    out.answered = not out.violations


# vLLM's constraints as its clients send them: (request fields, the pattern
# its answers match: whole when complete, a prefix of a match when cut by
# max_tokens).
VLLM_CONSTRAINTS = [
    ({"structured_outputs": {"choice": ["positive", "negative", "neutral"]}}, r"positive|negative|neutral"),
    ({"guided_regex": r"[A-Z][a-z]{2,9}, [0-9]{1,2}"}, r"[A-Z][a-z]{2,9}, [0-9]{1,2}"),
    ({"structured_outputs": {"grammar": 'root ::= ("yes" | "no") ", because " [a-z ]{1,40} "."'}},
     r"(yes|no), because [a-z ]{1,40}\."),
]


def follows(pattern: str, text: str, finish_reason: str | None) -> bool:
    """Whether an answer keeps to its constraint: matches it whole, or, cut
    by max_tokens, is a prefix of a match (the `regex` module's partial
    matching)."""
    return bool(regex.fullmatch(pattern, text, partial=finish_reason == "length"))


PREFILL = "Here are three tips:\n1."


async def vllm_constraint(ctx: Context, out: Outcome) -> None:
    """vLLM's structured outputs (a choice, a regex, a GBNF grammar) on chat
    or legacy completions, or a prefilled answer (continue_final_message and
    echo): an answer follows its constraint (whole, or as a prefix when cut
    by max_tokens); an echoed one opens with the prefill."""
    rng = ctx.rng
    body = out.request = {"model": ctx.model, "temperature": rng.choice([0, 0.7])}
    fields, pattern = rng.choice(VLLM_CONSTRAINTS)
    if rng.random() < 0.25:
        body.update(max_tokens=24, add_generation_prompt=False, continue_final_message=True, echo=True,
                    messages=[{"role": "user", "content": "How do I sleep better?"},
                              {"role": "assistant", "content": PREFILL}])
    elif rng.random() < 0.5:
        body.update(max_tokens=48, **fields,
                    messages=[{"role": "user", "content": "Is this review happy? 'Great food, slow service.'"}])
    else:
        body.update(max_tokens=48, **fields, prompt="Review: 'Great food, slow service.'\nVerdict:")
    personalise(body, rng)
    chat = "messages" in body
    response = await ctx.client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    if not record_status(out, response):
        return
    check_answer(out, response.json(), body, 1,
                 (lambda choice: choice["message"]["content"]) if chat else (lambda choice: choice.get("text")))
    text = out.texts[0] if out.texts else ""
    if body.get("echo"):
        if not text.startswith(PREFILL):
            out.fail(f"echoed answer does not open with the prefill: {text[:60]!r}")
    elif out.finish_reasons and not follows(pattern, text, out.finish_reasons[0]):
        out.fail(f"answer off its constraint {fields} ({out.finish_reasons[0]}): {text!r}")
    out.answered = not out.violations


async def vllm_tokens(ctx: Context, out: Outcome) -> None:
    """vLLM's token-level fields: allowed_token_ids (the answer uses only
    " yes" and " no", bad_words taking " no" away half the time),
    truncate_prompt_tokens (the prompt counts exactly that many tokens),
    return_token_ids on both (check_token_ids), and prompt_logprobs on a
    completion that only scores (one entry per prompt token, the first null)."""
    rng = ctx.rng
    kind = rng.choice(["allowed", "truncate", "score"])
    body = out.request = {"model": ctx.model, "temperature": rng.choice([0, 1.0]), "max_tokens": 8}
    personalise(body, rng)
    if kind == "score":
        body.update(prompt=a_prompt(rng), max_tokens=0, prompt_logprobs=rng.randint(0, 3))
        response = await ctx.client.post("/v1/completions", json=body)
        if not record_status(out, response):
            return
        data = response.json()
        scored = (data.get("choices") or [{}])[0].get("prompt_logprobs") or []
        if len(scored) != data["usage"]["prompt_tokens"] or scored[0] is not None:
            out.fail(f"{len(scored)} prompt_logprobs entries for {data['usage']['prompt_tokens']} prompt tokens")
        out.finish_reasons = [(data.get("choices") or [{}])[0].get("finish_reason")]
        out.answered = not out.violations
        return
    messages = [{"role": "user", "content": a_prompt(rng) if kind == "truncate" else "Yes or no: is tea hot?"}]
    body.update(messages=messages, return_token_ids=True)
    if kind == "truncate":
        body["truncate_prompt_tokens"] = keep = rng.randint(4, 64)
    else:
        tokenized = await ctx.client.post("/tokenize", json={"model": ctx.model, "prompt": " yes no",
                                                             "add_special_tokens": False})
        if not record_status(out, tokenized):
            return
        body.update(allowed_token_ids=tokenized.json()["tokens"], ignore_eos=True)
        if rng.random() < 0.5:
            body["bad_words"] = ["no"]
    response = await ctx.client.post("/v1/chat/completions", json=body)
    if not record_status(out, response):
        return
    data = response.json()
    check_answer(out, data, body, 1, lambda choice: choice["message"]["content"])
    words = set((out.texts[0] if out.texts else "").split())
    if kind == "truncate" and data["usage"]["prompt_tokens"] > keep:
        out.fail(f"truncate_prompt_tokens {keep}, but {data['usage']['prompt_tokens']} prompt tokens")
    if kind == "allowed" and not words <= ({"yes"} if body.get("bad_words") else {"yes", "no"}):
        out.fail(f"answer outside allowed_token_ids / bad_words: {out.texts[0]!r}")
    check_token_ids(out, data, body)
    out.answered = not out.violations


def check_token_ids(out: Outcome, data: dict, body: dict) -> None:
    """return_token_ids: the prompt's ids are as many as it counts, the
    answer's as many as its tokens, and within allowed_token_ids."""
    prompt, answer = data.get("prompt_token_ids") or [], (data.get("choices") or [{}])[0].get("token_ids") or []
    if len(prompt) != data["usage"]["prompt_tokens"] or len(answer) != data["usage"]["completion_tokens"]:
        out.fail(f"return_token_ids: {len(prompt)} / {len(answer)} ids for usage {data['usage']}")
    if not set(answer) <= set(body.get("allowed_token_ids") or answer):
        out.fail(f"token_ids outside allowed_token_ids: {answer}")


async def hang_up_mid_stream(ctx: Context, out: Outcome) -> None:
    body = out.request = chat_body(ctx, stream=True)
    body["max_tokens"] = 64
    body.pop("n", None)
    async with ctx.client.stream("POST", "/v1/chat/completions", json=body) as response:
        if not await stream_status(out, response):
            return
        state = await read_chunk_stream(ctx, out, response, chat=True, stop_after=ctx.rng.randint(1, 6))
    if state is not None:  # the answer ended before we hung up
        check_chunk_stream(out, state, body, 1)


async def hang_up_mid_prefill(ctx: Context, out: Outcome) -> None:
    """A long prompt, and the client gone before its first byte."""
    rng = ctx.rng
    body = out.request = {"model": ctx.model, "max_tokens": 32, "stream": rng.random() < 0.5,
                          "messages": [{"role": "user", "content": long_prompt(rng)}]}
    personalise(body, rng)
    task = asyncio.ensure_future(ctx.client.post("/v1/chat/completions", json=body))
    await asyncio.sleep(rng.uniform(0.02, 0.6))
    if task.done():
        response = task.result()
        record_status(out, response)
        out.answered = response.status_code == 200
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        out.cancelled = True


def invalid_requests(model: str) -> list[tuple[str, str, dict | bytes]]:
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return [
        ("POST", "/v1/chat/completions", {**chat, "model": "no-such-model"}),
        ("POST", "/v1/chat/completions", {**chat, "n": 1.5}),
        ("POST", "/v1/chat/completions", {**chat, "foo": 1}),
        ("POST", "/v1/chat/completions", {**chat, "temperature": -1}),
        ("POST", "/v1/chat/completions", {**chat, "messages": []}),
        ("POST", "/v1/chat/completions", {**chat, "max_tokens": 10**6}),
        ("POST", "/v1/chat/completions", {**chat, "preference": "x", "pad": {"weight": 1000}}),
        ("POST", "/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}],
                                          "tool_choice": {"type": "function", "function": {"name": "g"}}}),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
        ("POST", "/v1/chat/completions", b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", '
                                                                           b'"content": "\\ud800"}]}'),
        ("POST", "/v1/chat/completions", b'{"model": '),
        ("POST", "/v1/completions", {"model": model, "prompt": "hi", "logprobs": 9}),
        ("POST", "/v1/responses", {"model": model, "input": "hi", "previous_response_id": "resp_1"}),
        ("GET", "/v1/no-such-endpoint", b""),
    ]


async def invalid_request(ctx: Context, out: Outcome) -> None:
    out.expected_4xx = True
    method, path, body = ctx.rng.choice(invalid_requests(ctx.model))
    out.request = {"method": method, "path": path, "body": body if isinstance(body, dict) else body.decode()}
    if isinstance(body, dict):
        response = await ctx.client.request(method, path, json=body)
    else:
        response = await ctx.client.request(method, path, content=body or None,
                                            headers={"Content-Type": "application/json"} if body else None)
    out.status = response.status_code
    if not 400 <= response.status_code < 500:
        if response.status_code != 503:  # 503 only during a worker kill; judged there
            out.fail(f"invalid request answered {response.status_code}")
    check_error_body(out, response)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


async def tools_auto(ctx: Context, out: Outcome) -> None:
    """tools with tool_choice left at "auto": the answer is well-formed calls
    (finish_reason "tool_calls", no content) or text, never a mix."""
    rng = ctx.rng
    question = rng.choice(["What's the weather in Paris?", "Is it raining in Rome?", a_prompt(rng)])
    body = out.request = {"model": ctx.model, "max_tokens": rng.randint(8, ctx.max_tokens_cap),
                          "messages": [{"role": "user", "content": question}], "tools": [WEATHER_TOOL]}
    personalise(body, rng)
    sampling(body, rng)
    answered = await post_one_choice(ctx, out, body)
    if answered is None:
        return
    choice, reasons = answered
    message = choice["message"]
    calls = message.get("tool_calls")
    if calls:
        if reasons[0] != "tool_calls" or message.get("content") is not None:
            out.fail(f"calls with finish_reason {reasons[0]} and content {message.get('content')!r}")
        for call in calls:
            try:
                arguments = json.loads(call["function"]["arguments"])
                if call["function"]["name"] != "get_weather" or set(arguments) != {"city"}:
                    out.fail(f"a call off its schema: {call}")
            except ValueError:
                out.fail(f"call arguments are not JSON: {call}")
    else:
        text = message.get("content") or ""
        if reasons[0] == "tool_calls" or (reasons[0] == "stop" and text.lstrip()[:1] in ("[", "{")):
            out.fail(f"finish_reason {reasons[0]} with text {text[:80]!r}")
        check_text(out, text, body)
    out.texts, out.finish_reasons = [message.get("content") or json.dumps(calls)], reasons
    out.answered = not out.violations


async def multi_turn(ctx: Context, out: Outcome) -> None:
    """A conversation of 2-4 turns, each sending the model's own earlier
    answers back (what the prefix cache serves)."""
    rng = ctx.rng
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    extra: dict = {}
    personalise(extra, rng)
    texts: list[str] = []
    for _ in range(rng.randint(2, 4)):
        messages = [*messages, {"role": "user", "content": a_prompt(rng, long_share=0.1)}]
        body = out.request = {"model": ctx.model, "max_tokens": rng.randint(1, ctx.max_tokens_cap),
                              "messages": messages, "temperature": 0, **extra}
        response = await ctx.client.post("/v1/chat/completions", json=body)
        if not record_status(out, response):
            return
        (choice,) = check_answer(out, response.json(), body, 1, lambda c: c["message"]["content"])
        texts += out.texts
        out.texts = list(texts)  # every turn's answer (the checks count U+FFFD over all of them)
        messages = [*messages, {"role": "assistant", "content": choice["message"]["content"] or ""}]
    out.answered = not out.violations


# ---- the stateful APIs: kept responses, conversations, profiles, feedback --
RUN_TAG = uuid.uuid4().hex[:8]  # this run's users, apart from an earlier run's on the same server
LOCK_RETRY_S = 10.0  # how long a conversation may stay locked after a client hung up in it
HANG_UP_MAX_TOKENS = 128  # a turn hung up on (aborted: it costs a few tokens)
TURN_PROMPTS = [
    "My name is Ada. What is a good name for a cat?",
    "What is the capital of Italy?",
    "Give me one tip for cooking rice.",
    "Which is bigger, the sun or the moon?",
    "What did I ask you before?",
    "Name a colour of the rainbow.",
    "Say something kind in French.",
    "How many legs does a spider have?",
]
LONG_ANSWER_PROMPTS = [
    "Explain in detail, step by step, how a bicycle works.",
    "Write a long story about a dragon who learns to bake bread.",
    "Describe, in many sentences, a walk through a busy market.",
]
INITIAL_ITEMS = [
    [{"role": "user", "content": "My name is Ada and I live in Lyon."},
     {"type": "message", "role": "assistant", "content": "Nice to meet you, Ada!"}],
    [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "I like short answers."}]}],
]


def tokens_between(ctx: Context, low: int, high: int) -> int:
    """A max_tokens in [low, high], within --max-tokens."""
    return ctx.rng.randint(min(low, ctx.max_tokens_cap), min(high, ctx.max_tokens_cap))


def note_status(out: Outcome, response: httpx.Response) -> None:
    """A request's status on its scenario's outcome; a 5xx seen earlier in the
    scenario stays there (the report counts it)."""
    if (out.status or 0) < 500:
        out.status = response.status_code


def error_code(out: Outcome, response: httpx.Response) -> str | None:
    """An error answer's code (its body checked: check_error_body)."""
    return (check_error_body(out, response) or {}).get("code")


def expect(out: Outcome, response: httpx.Response, what: str, status: int = 200, code: str | None = None) -> bool:
    """The response is `status` (with an error, OpenAI's body with `code`);
    a failure of the scenario otherwise. True when it is. (An error
    expected leaves the scenario's status as it was: the status it shows is
    its answers', a 5xx, or an error it did not expect.)"""
    previous = out.status
    note_status(out, response)
    if response.status_code != status:
        out.fail(f"{what}: {response.status_code} (expected {status}{' ' + code if code else ''}): "
                 f"{response.text[:200]!r}")
        if response.status_code >= 400:
            check_error_body(out, response)
        return False
    if status >= 400:
        got = error_code(out, response)
        if code is not None and got != code:
            out.fail(f"{what}: error code {got!r} (expected {code!r})")
            return False
        out.status = previous if previous is not None else out.status
    return True


@dataclass
class Reply:
    """What POST /v1/responses gave: its status, and the response (checked;
    None when refused or malformed) or the error's code."""

    status: int
    final: dict | None = None
    code: str | None = None


async def create_response(ctx: Context, out: Outcome, body: dict) -> Reply:
    """POST /v1/responses, streamed when the body says so; the answer checked
    (check_response_object, and a stream's events: read_responses_events)."""
    if not body.get("stream"):
        response = await ctx.client.post("/v1/responses", json=body)
        note_status(out, response)
        if response.status_code != 200:
            return Reply(response.status_code, code=error_code(out, response))
        data = response.json()
        return Reply(200, data if check_response_object(out, data, body) is not None else None)
    async with ctx.client.stream("POST", "/v1/responses", json=body) as response:
        note_status(out, response)
        if response.status_code != 200:
            await response.aread()
            return Reply(response.status_code, code=error_code(out, response))
        events = [(name, json.loads(raw)) async for name, raw in sse_events(response)]
    return Reply(200, read_responses_events(out, events, body))


def answered(out: Outcome, reply: Reply, what: str) -> dict | None:
    """The response of a request that must be answered (a failure otherwise)."""
    if reply.status != 200:
        out.fail(f"{what}: {reply.status} {reply.code}")
    return reply.final


def item_key(item: dict) -> tuple:
    """What an item says, whatever shape it was sent in: a message's (type,
    role, text), its content a string or parts; another item's type and
    fields but its id and status."""
    kind = item.get("type", "message")
    if kind == "message":
        return "message", item.get("role"), message_text(item)
    return kind, json.dumps({k: v for k, v in item.items() if k not in ("id", "status", "type")}, sort_keys=True)


def input_keys(sent: str | list[dict]) -> list[tuple]:
    """A request's `input` (text or items) as item_keys."""
    return [("message", "user", sent)] if isinstance(sent, str) else [item_key(item) for item in sent]


def input_items_problems(sent: str | list[dict], listed: list[dict]) -> list[str]:
    """A kept response's input items, listed oldest first, against its
    request's input: the same items in the same order, each with an id of
    its own, a message's content as parts."""
    problems = []
    got, want = [item_key(item) for item in listed], input_keys(sent)
    if got != want:
        problems.append(f"input items {got} are not the input sent {want}")
    ids = [item.get("id") for item in listed]
    if not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != len(ids):
        problems.append(f"input item ids missing or repeated: {ids}")
    if any(item.get("type", "message") == "message" and not isinstance(item.get("content"), list) for item in listed):
        problems.append("a listed input message whose content is not parts")
    return problems


@dataclass
class Turn:
    """A response answered in a conversation: the items it must have added
    there, in order (its input's, then its answer's output items as
    returned), and its input tokens (a later turn reads it: more)."""

    label: str
    inputs: list[tuple]
    outputs: list[dict]
    input_tokens: int | None = None

    @classmethod
    def of(cls, sent: str | list[dict], response: dict) -> Turn:
        return cls(response.get("id", "?"), input_keys(sent), list(response.get("output") or []),
                   (response.get("usage") or {}).get("input_tokens"))

    def matches(self, items: list[dict]) -> bool:
        n = len(self.inputs)
        return (len(items) == n + len(self.outputs) and [item_key(i) for i in items[:n]] == self.inputs
                and items[n:] == self.outputs)


def describe_item(item: dict) -> str:
    kind, *rest = item_key(item)
    return f"{item.get('id')} {kind} {' '.join(str(r)[:40] for r in rest)!r}"


def conversation_problems(listed: list[dict], before: list[dict], turns: list[Turn],
                          any_order: bool = False) -> list[str]:
    """A conversation's items, listed oldest first, against what it must hold:
    the items it held `before` (unchanged), then each turn's input items
    directly followed by its own answer's items, in the turns' order
    (`any_order`: each turn once, in some order, as two responses sent at
    once may be answered), nothing lost, nothing else; every item with an id
    of its own; each turn reading more tokens than the turn before it (it
    read that turn)."""
    problems = []
    ids = [item.get("id") for item in listed]
    if not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != len(ids):
        problems.append(f"item ids missing or repeated: {ids}")
    if listed[:len(before)] != before:
        problems.append(f"the {len(before)} items held before changed: now {[describe_item(i) for i in listed]}")
        return problems
    rest, remaining, order, at = listed[len(before):], list(turns), [], 0
    while at < len(rest) and remaining:
        turn = next((t for t in (remaining if any_order else remaining[:1])
                     if t.matches(rest[at:at + len(t.inputs) + len(t.outputs)])), None)
        if turn is None:
            expected = " or ".join(f"{t.label}'s {t.inputs} then its answer" for t in remaining)
            problems.append(f"item {len(before) + at} ({describe_item(rest[at])}) is not where {expected} "
                            f"should be: items {[describe_item(i) for i in rest]}")
            return problems
        remaining.remove(turn)
        order.append(turn)
        at += len(turn.inputs) + len(turn.outputs)
    if remaining:
        problems.append(f"turn(s) {[t.label for t in remaining]} missing from the conversation")
    if at < len(rest):
        problems.append(f"items that no turn added: {[describe_item(i) for i in rest[at:]]}")
    for earlier, later in zip(order, order[1:]):
        if None not in (earlier.input_tokens, later.input_tokens) and later.input_tokens <= earlier.input_tokens:
            problems.append(f"{later.label} read {later.input_tokens} input tokens, no more than {earlier.label} "
                            f"before it ({earlier.input_tokens}): it did not read that turn")
    return problems


async def list_items(ctx: Context, out: Outcome, conversation_id: str, what: str) -> list[dict] | None:
    """A conversation's items oldest first: a page of 100 (we hold fewer);
    now and then also its pages of 1-3 following `after`, or newest first
    (the default order), which must say the same."""
    rng = ctx.rng
    path = f"/v1/conversations/{conversation_id}/items"
    response = await ctx.client.get(path, params={"order": "asc", "limit": 100})
    if not expect(out, response, what):
        return None
    page = response.json()
    items = page["data"]
    if page.get("object") != "list" or page.get("has_more") is not False \
            or page.get("first_id") != (items[0]["id"] if items else None) \
            or page.get("last_id") != (items[-1]["id"] if items else None):
        out.fail(f"{what}: a page {({k: v for k, v in page.items() if k != 'data'})} for {len(items)} items")
    roll = rng.random()
    if roll < 0.2:
        paged, after, limit = [], None, rng.randint(1, 3)
        for _ in range(len(items) + 2):
            response = await ctx.client.get(path, params={"order": "asc", "limit": limit,
                                                          **({"after": after} if after else {})})
            if not expect(out, response, f"{what} (pages of {limit})"):
                return None
            page = response.json()
            paged += page["data"]
            if not page["has_more"]:
                break
            after = page["last_id"]
        if paged != items:
            out.fail(f"{what}: pages of {limit} give {[i.get('id') for i in paged]}, "
                     f"one page {[i.get('id') for i in items]}")
    elif roll < 0.35:
        response = await ctx.client.get(path)
        if not expect(out, response, f"{what} (newest first)"):
            return None
        if response.json()["data"] != items[::-1][:20]:
            out.fail(f"{what}: newest first is not the items reversed")
    return items


async def new_conversation(ctx: Context, out: Outcome) -> tuple[str, list[dict]] | None:
    """Creates a conversation (now and then with items): (its id, its items)."""
    initial = ctx.rng.choice([None, None, *INITIAL_ITEMS])
    body: dict = {"metadata": {"soak": RUN_TAG}, **({"items": initial} if initial else {})}
    response = await ctx.client.post("/v1/conversations", json=body)
    if not expect(out, response, "create a conversation"):
        return None
    made = response.json()
    if not str(made.get("id")).startswith("conv_") or made.get("object") != "conversation" \
            or made.get("metadata") != body["metadata"]:
        out.fail(f"created conversation {made}")
        return None
    items = await list_items(ctx, out, made["id"], "list a new conversation's items")
    if items is not None and [item_key(i) for i in items] != input_keys(initial or []):
        out.fail(f"a new conversation holds {[item_key(i) for i in items]}, created with {input_keys(initial or [])}")
    return (made["id"], items) if items is not None else None


def turn_body(ctx: Context, conversation_id: str, prompt: str | None = None, stream: bool | None = None,
              max_tokens: int | None = None) -> dict:
    """A response in a conversation (named as an id or {"id"}), its input
    text or a message item, streamed or not."""
    rng = ctx.rng
    text = prompt or rng.choice(TURN_PROMPTS)
    body = {"model": ctx.model, "conversation": conversation_id if rng.random() < 0.7 else {"id": conversation_id},
            "input": rng.choice([text, [{"role": "user", "content": text}],
                                 [{"type": "message", "role": "user",
                                   "content": [{"type": "input_text", "text": text}]}]]),
            "max_output_tokens": max_tokens or tokens_between(ctx, 16, 48),
            "temperature": rng.choice([0, 0.7])}
    if rng.random() < 0.15:
        body["preference"] = rng.choice(PREFERENCES)
    if stream if stream is not None else rng.random() < 0.5:
        body["stream"] = True
    return body


async def conversation_turn(ctx: Context, out: Outcome, body: dict, conversation_id: str, what: str) -> dict | None:
    """A turn that must be answered, in its conversation."""
    final = answered(out, await create_response(ctx, out, body), what)
    if final is not None and final.get("conversation") != {"id": conversation_id}:
        out.fail(f"{what}: the response's conversation is {final.get('conversation')}")
    return final


async def next_turn(ctx: Context, out: Outcome, conversation_id: str, what: str) -> Turn | None:
    """A turn of random shape (turn_body), kept in out.request["turns"],
    that must be answered; None when it was not (the failure noted)."""
    body = turn_body(ctx, conversation_id)
    out.request["turns"].append(body)
    final = await conversation_turn(ctx, out, body, conversation_id, what)
    return None if final is None else Turn.of(body["input"], final)


async def delete_conversation(ctx: Context, out: Outcome, conversation_id: str, what: str) -> bool:
    response = await ctx.client.delete(f"/v1/conversations/{conversation_id}")
    if not expect(out, response, what):
        return False
    if response.json() != {"id": conversation_id, "object": "conversation.deleted", "deleted": True}:
        out.fail(f"{what}: {response.json()}")
    return True


async def check_conversation_gone(ctx: Context, out: Outcome, conversation_id: str) -> None:
    """A deleted conversation: not found to read, list, or answer in."""
    for what, response in (
            ("GET a deleted conversation", await ctx.client.get(f"/v1/conversations/{conversation_id}")),
            ("list a deleted conversation's items", await ctx.client.get(f"/v1/conversations/{conversation_id}/items")),
            ("a response in a deleted conversation", await ctx.client.post("/v1/responses", json={
                "model": ctx.model, "input": "hi", "max_output_tokens": 4, "conversation": conversation_id}))):
        expect(out, response, what, 404, "conversation_not_found")


async def conversation(ctx: Context, out: Outcome) -> None:
    """A conversation of 2-3 turns (streamed and not): its items are exactly
    each turn's input then its answer, in order; now and then an item
    deleted (the others stay, in order, and the conversation goes on), and
    the conversation deleted (then not found)."""
    rng = ctx.rng
    made = await new_conversation(ctx, out)
    if made is None:
        return
    conversation_id, before = made
    out.request = {"conversation": conversation_id, "turns": []}
    turns = []
    for number in range(rng.randint(2, 3)):
        turn = await next_turn(ctx, out, conversation_id, f"turn {number + 1}")
        if turn is None:
            return
        turns.append(turn)
    items = await list_items(ctx, out, conversation_id, "list the conversation's items")
    if items is None:
        return
    for problem in conversation_problems(items, before, turns):
        out.fail(problem)
    if out.violations:
        return
    if rng.random() < 0.35:  # an item deleted: the others stay, in order
        victim = rng.choice(items)
        path = f"/v1/conversations/{conversation_id}/items/{victim['id']}"
        response = await ctx.client.get(path)
        if expect(out, response, "GET an item") and response.json() != victim:
            out.fail(f"GET item {victim['id']} is {response.json()}, listed {victim}")
        response = await ctx.client.delete(path)
        if expect(out, response, "DELETE an item") and response.json().get("id") != conversation_id:
            out.fail(f"DELETE an item answered {response.json()}")
        expect(out, await ctx.client.get(path), "GET a deleted item", 404, "item_not_found")
        expect(out, await ctx.client.delete(path), "DELETE a deleted item", 404, "item_not_found")
        items_left = await list_items(ctx, out, conversation_id, "list the items after a delete")
        if items_left is None:
            return
        if items_left != [i for i in items if i["id"] != victim["id"]]:
            out.fail(f"after deleting {victim['id']}: {[i.get('id') for i in items_left]}, "
                     f"were {[i.get('id') for i in items]}")
            return
        if rng.random() < 0.5:  # and the conversation goes on
            turn = await next_turn(ctx, out, conversation_id, "a turn after an item's delete")
            if turn is None:
                return
            items = await list_items(ctx, out, conversation_id, "list the items after that turn")
            if items is None:
                return
            for problem in conversation_problems(items, items_left, [turn]):
                out.fail(problem)
    if rng.random() < 0.5 and await delete_conversation(ctx, out, conversation_id, "DELETE the conversation"):
        await check_conversation_gone(ctx, out, conversation_id)
    out.answered = not out.violations


async def conversation_race(ctx: Context, out: Outcome) -> None:
    """Two responses sent at once in one conversation: both answered (one
    after the other), or one answered and the other OpenAI's 400
    conversation_locked; never a 5xx; the conversation then holds each
    answered turn whole (its input directly followed by its own answer)."""
    rng = ctx.rng
    made = await new_conversation(ctx, out)
    if made is None:
        return
    conversation_id, before = made
    out.request = {"conversation": conversation_id, "turns": []}
    if rng.random() < 0.5:
        if await next_turn(ctx, out, conversation_id, "the turn before the race") is None:
            return
        before = await list_items(ctx, out, conversation_id, "list the items before the race")
        if before is None:
            return
    bodies = [turn_body(ctx, conversation_id, prompt=p, max_tokens=tokens_between(ctx, 16, 32))
              for p in rng.sample(TURN_PROMPTS, 2)]
    out.request["race"] = bodies
    delay = rng.choice([0.0, 0.0, rng.uniform(0.05, 1.5)])  # the second a moment later: maybe after the first

    async def send(body: dict, after: float) -> Reply:
        await asyncio.sleep(after)
        return await create_response(ctx, out, body)

    out.request["second_after_s"] = round(delay, 2)
    replies = await asyncio.gather(send(bodies[0], 0.0), send(bodies[1], delay))
    out.request["race_statuses"] = [(r.status, r.code) for r in replies]
    locked = [r for r in replies if r.status == 400 and r.code == "conversation_locked"]
    for reply in replies:
        if reply.status != 200 and reply not in locked:
            out.fail(f"a response sent at once with another in its conversation: {reply.status} {reply.code}")
    if len(locked) == 2:
        out.fail("both responses sent at once were conversation_locked (nothing else held the conversation)")
    won = [Turn.of(body["input"], reply.final) for body, reply in zip(bodies, replies) if reply.final is not None]
    if out.violations:
        return
    items = await list_items(ctx, out, conversation_id, "list the items after the race")
    if items is None:
        return
    for problem in conversation_problems(items, before, won, any_order=True):
        out.fail(problem)
    if rng.random() < 0.5 and await delete_conversation(ctx, out, conversation_id, "DELETE the conversation"):
        await check_conversation_gone(ctx, out, conversation_id)
    out.answered = not out.violations


async def conversation_hang_up(ctx: Context, out: Outcome) -> None:
    """A client that hangs up mid-stream in a conversation: the conversation
    takes a turn again within LOCK_RETRY_S (retried while
    conversation_locked), and the turn hung up on added nothing."""
    rng = ctx.rng
    made = await new_conversation(ctx, out)
    if made is None:
        return
    conversation_id, before = made
    # Not bound by --max-tokens: an answer the server could finish before it sees the client gone
    # (a tiny model's few tokens) would be a turn answered, not one hung up on.
    body = turn_body(ctx, conversation_id, prompt=rng.choice(LONG_ANSWER_PROMPTS), stream=True,
                     max_tokens=HANG_UP_MAX_TOKENS)
    body["temperature"] = 0
    leave_after = rng.randint(1, 6)
    events: list[tuple[str | None, dict]] = []
    out.request = {"conversation": conversation_id, "hung_up": body, "leave_after_events": leave_after}
    async with ctx.client.stream("POST", "/v1/responses", json=body) as response:
        note_status(out, response)
        if response.status_code != 200:
            await response.aread()
            out.fail(f"the turn to hang up on: {response.status_code} {error_code(out, response)}")
            return
        async for name, raw in sse_events(response):
            events.append((name, json.loads(raw)))
            if len(events) >= leave_after:
                out.cancelled = True
                break
    out.request["events_seen"] = [name for name, _ in events]
    turns = []
    if not out.cancelled:  # it ended first: an ordinary turn
        final = read_responses_events(out, events, body)
        if final is None:
            return
        turns.append(Turn.of(body["input"], final))
    hung_up_at = time.monotonic()
    following = turn_body(ctx, conversation_id, max_tokens=tokens_between(ctx, 16, 32))
    out.request["following"] = following
    tries, unlocked_after = 0, 0.0
    while True:
        unlocked_after = time.monotonic() - hung_up_at
        reply = await create_response(ctx, out, following)
        tries += 1
        if reply.status == 400 and reply.code == "conversation_locked" and time.monotonic() - hung_up_at < LOCK_RETRY_S:
            await asyncio.sleep(0.25)
            continue
        break
    out.request["unlocked_after_s"], out.request["tries"] = round(unlocked_after, 2), tries
    if reply.status != 200:
        out.fail(f"the conversation after a client hung up in it ({leave_after} events in): {reply.status} "
                 f"{reply.code} after {time.monotonic() - hung_up_at:.1f} s, {tries} tries")
        return
    if reply.final is None:
        return
    turns.append(Turn.of(following["input"], reply.final))
    items = await list_items(ctx, out, conversation_id, "list the items after a hang-up")
    if items is None:
        return
    problems = conversation_problems(items, before, turns)
    hung = input_keys(body["input"])[0]
    if out.cancelled and any(item_key(item) == hung for item in items):
        answers = [(i.get("status"), len(message_text(i))) for i in items if i.get("role") == "assistant"]
        problems.insert(0, f"the turn hung up on ({leave_after} events in: {out.request['events_seen']}) "
                           f"added items: {[describe_item(i) for i in items]}; answers (status, length): {answers}")
    for problem in problems:
        out.fail(problem)
    out.answered = not out.violations


async def conversation_delete_mid_stream(ctx: Context, out: Outcome) -> None:
    """A conversation deleted while a response in it streams: the DELETE is
    answered, the stream ends cleanly (its events checked) or with an error
    event then response.failed; then the conversation is not found."""
    rng = ctx.rng
    made = await new_conversation(ctx, out)
    if made is None:
        return
    conversation_id, _ = made
    body = turn_body(ctx, conversation_id, prompt=rng.choice(LONG_ANSWER_PROMPTS), stream=True,
                     max_tokens=tokens_between(ctx, 48, 48))
    delete_after = rng.randint(1, 6)
    out.request = {"conversation": conversation_id, "body": body, "delete_after_events": delete_after}
    events: list[tuple[str | None, dict]] = []
    deleted = False
    async with ctx.client.stream("POST", "/v1/responses", json=body) as response:
        note_status(out, response)
        if response.status_code != 200:
            await response.aread()
            out.fail(f"the turn to delete under: {response.status_code} {error_code(out, response)}")
            return
        async for name, raw in sse_events(response):
            events.append((name, json.loads(raw)))
            if len(events) == delete_after:
                deleted = await delete_conversation(ctx, out, conversation_id, "DELETE a conversation mid-stream")
    if len(events) < delete_after:  # the stream ended first
        deleted = await delete_conversation(ctx, out, conversation_id, "DELETE a conversation after its stream")
    out.request["events_seen"] = [name for name, _ in events]
    read_responses_events(out, events, body, error_ok=True)
    if deleted:
        await check_conversation_gone(ctx, out, conversation_id)
    out.answered = not out.violations


async def stored_responses(ctx: Context, out: Outcome) -> None:
    """A chain of 2-3 kept responses (previous_response_id; streamed and
    not): each GET equals what was returned, its input_items are its own
    input; one deleted is then not found (nor continued); a response with
    store false is not kept."""
    rng = ctx.rng
    chain: list[tuple[dict, dict]] = []
    out.request = {"chain": []}
    for number in range(rng.randint(2, 3)):
        text = rng.choice(TURN_PROMPTS)
        body = {"model": ctx.model, "input": rng.choice([text, [{"role": "user", "content": text}]]),
                "max_output_tokens": tokens_between(ctx, 16, 48),
                "temperature": rng.choice([0, 0.7])}
        if rng.random() < 0.5:
            body["store"] = True
        if chain:
            body["previous_response_id"] = chain[-1][1]["id"]
        if rng.random() < 0.5:
            body["stream"] = True
        out.request["chain"].append(body)
        final = answered(out, await create_response(ctx, out, body), f"response {number + 1} of a chain")
        if final is None:
            return
        if final.get("store") is not True or final.get("previous_response_id") != body.get("previous_response_id"):
            out.fail(f"response {final.get('id')}: store {final.get('store')}, previous_response_id "
                     f"{final.get('previous_response_id')} for {body.get('previous_response_id')}")
        if chain and final["usage"]["input_tokens"] <= chain[-1][1]["usage"]["input_tokens"]:
            out.fail(f"{final['id']} read {final['usage']['input_tokens']} input tokens, no more than the response "
                     f"it continues ({chain[-1][1]['usage']['input_tokens']})")
        chain.append((body, final))
    for body, final in chain:
        path = f"/v1/responses/{final['id']}"
        response = await ctx.client.get(path)
        if expect(out, response, "GET a kept response") and response.json() != final:
            got = response.json()
            out.fail(f"GET {final['id']} differs from what was returned in "
                     f"{sorted(k for k in set(got) | set(final) if got.get(k) != final.get(k))}")
        order = rng.choice(["asc", "desc"])
        response = await ctx.client.get(f"{path}/input_items", params={"order": order})
        if expect(out, response, "GET a kept response's input_items"):
            listed = response.json()["data"]
            for problem in input_items_problems(body["input"], listed if order == "asc" else listed[::-1]):
                out.fail(f"{final['id']}: {problem}")
    body, victim = rng.choice(chain)
    path = f"/v1/responses/{victim['id']}"
    response = await ctx.client.delete(path)
    if expect(out, response, "DELETE a kept response") and \
            response.json() != {"id": victim["id"], "object": "response", "deleted": True}:
        out.fail(f"DELETE {victim['id']} answered {response.json()}")
    expect(out, await ctx.client.get(path), "GET a deleted response", 404, "response_not_found")
    expect(out, await ctx.client.get(f"{path}/input_items"), "input_items of a deleted response", 404,
           "response_not_found")
    expect(out, await ctx.client.delete(path), "DELETE a deleted response", 404, "response_not_found")
    if rng.random() < 0.5:
        response = await ctx.client.post("/v1/responses", json={
            "model": ctx.model, "input": "hi", "max_output_tokens": 4, "previous_response_id": victim["id"]})
        expect(out, response, "continue a deleted response", 400, "previous_response_not_found")
    kept = [final for _, final in chain if final is not victim]
    if kept:
        survivor = rng.choice(kept)
        response = await ctx.client.get(f"/v1/responses/{survivor['id']}")
        if expect(out, response, "GET a response kept beside a deleted one") and response.json() != survivor:
            out.fail(f"GET {survivor['id']} after another's delete differs from what was returned")
    if rng.random() < 0.5:  # store false: answered, not kept
        body = {"model": ctx.model, "input": rng.choice(TURN_PROMPTS), "store": False,
                "max_output_tokens": tokens_between(ctx, 8, 24), **({"stream": True} if rng.random() < 0.5 else {})}
        out.request["unstored"] = body
        final = answered(out, await create_response(ctx, out, body), "a response with store false")
        if final is None:
            return
        if final.get("store") is not False:
            out.fail(f"a response with store false says store {final.get('store')}")
        expect(out, await ctx.client.get(f"/v1/responses/{final['id']}"), "GET a response with store false", 404,
               "response_not_found")
    out.answered = not out.violations


def preference_list(items: list) -> list[dict]:
    """A profile's preferences as the server returns them: {"text", "weight"}, 1.0 by default."""
    return [{"text": p, "weight": 1.0} if isinstance(p, str)
            else {"text": p["text"], "weight": float(p.get("weight", 1.0))} for p in items]


def patched(current: list[dict], add: list, remove: list[str]) -> list[dict]:
    """A profile after PATCH: the texts removed, then each added one's weight
    replaced in place when held, else appended."""
    merged = [p for p in current if p["text"] not in set(remove)]
    for pref in preference_list(add):
        at = next((i for i, p in enumerate(merged) if p["text"] == pref["text"]), None)
        if at is None:
            merged.append(pref)
        else:
            merged[at] = pref
    return merged


def profile_problems(got: dict, user: str, preferences: list[dict]) -> list[str]:
    problems = []
    if got.get("object") != "user.preferences" or got.get("user") != user:
        problems.append(f"profile object {got.get('object')!r} of user {got.get('user')!r}")
    if got.get("preferences") != preferences:
        problems.append(f"profile preferences {got.get('preferences')}, expected {preferences}")
    created, updated = got.get("created_at"), got.get("updated_at")
    if not isinstance(created, int) or not isinstance(updated, int) or updated < created:
        problems.append(f"profile created_at {created!r}, updated_at {updated!r}")
    return problems


def feedback_problems(sent: dict, got: dict, user: str | None) -> list[str]:
    """A feedback record against what was sent: the same completion, choice,
    rating (thumbs as "up"/"down"), pairwise choice and comment, its user's."""
    rating = sent.get("rating")
    over = sent.get("preferred_over")
    want = {"object": "feedback", "completion_id": sent["completion_id"], "choice_index": sent.get("choice_index", 0),
            "rating": rating.lower() if isinstance(rating, str) else rating, "preferred_over": over,
            "preferred_over_choice_index": sent.get("preferred_over_choice_index", 0) if over else None,
            "comment": sent.get("comment"), "user": user}
    problems = [f"feedback {key} {got.get(key)!r}, expected {value!r}" for key, value in want.items()
                if got.get(key) != value]
    if not str(got.get("id")).startswith("fb-") or not isinstance(got.get("created_at"), int):
        problems.append(f"feedback id {got.get('id')!r}, created_at {got.get('created_at')!r}")
    return problems


async def user_preferences(ctx: Context, out: Outcome) -> None:
    """A user's preference profile (PUT, PATCH, GET, DELETE) used by chats
    that name the user and send no preference (pad.source "profile"), and
    feedback on those answers (a rating, a pairwise choice, a comment)."""
    rng = ctx.rng
    user = f"soak-{RUN_TAG}-{rng.getrandbits(32):08x}"
    path = f"/v1/users/{user}/preferences"
    out.request = {"user": user}
    expect(out, await ctx.client.get(path), "GET a profile not made yet", 404, "user_not_found")
    expect(out, await ctx.client.patch(path, json={"add": ["x"]}), "PATCH a profile not made yet", 404,
           "user_not_found")
    first, second, third = rng.sample(PREFERENCES, 3)
    put = [first, {"text": second, "weight": rng.choice([0.5, 1.0, 2.0])}]
    response = await ctx.client.put(path, json={"preferences": put})
    if not expect(out, response, "PUT a profile"):
        return
    profile = preference_list(put)
    for problem in profile_problems(response.json(), user, profile):
        out.fail(f"PUT: {problem}")
    if rng.random() < 0.6:
        add = [{"text": third, "weight": 0.5}, *([{"text": second, "weight": 1.0}] if rng.random() < 0.5 else [])]
        remove = rng.choice([[], [first], ["not held"]])
        response = await ctx.client.patch(path, json={"add": add, "remove": remove})
        if not expect(out, response, "PATCH a profile"):
            return
        profile = patched(profile, add, remove)
        for problem in profile_problems(response.json(), user, profile):
            out.fail(f"PATCH: {problem}")
    response = await ctx.client.get(path)
    if expect(out, response, "GET a profile"):
        for problem in profile_problems(response.json(), user, profile):
            out.fail(f"GET: {problem}")
    messages = [{"role": "user", "content": rng.choice(SHORT_PROMPTS)}]
    completions = []
    for number in range(rng.choice([1, 2])):
        body = {"model": ctx.model, "user": user, "messages": messages, "max_tokens": tokens_between(ctx, 8, 24),
                "temperature": rng.choice([0, 0.7])}
        plain = number == 1 and rng.random() < 0.5
        if plain:
            body["preference"] = None  # this request only: no profile
        data = await chat_as(ctx, out, body, f"a chat as {user}")
        if data is None:
            return
        pad = data.get("pad") or {}
        want = ("none", []) if plain else ("profile", profile)
        if (pad.get("source"), pad.get("preferences")) != want:
            out.fail(f"chat as {user}{' with preference null' if plain else ''}: pad {pad}, expected "
                     f"source {want[0]} with {want[1]}")
        completions.append(data["id"])
    sent: dict = {"completion_id": completions[0]}
    if rng.random() < 0.7 or len(completions) == 1:
        sent["rating"] = rng.choice(["up", "down", "Up", 1, 3, 5])
    if len(completions) == 2:
        sent["preferred_over"] = completions[1]
    if rng.random() < 0.3 or len(sent) == 1:
        sent["comment"] = "soak: shorter, please"
    response = await ctx.client.post("/v1/feedback", json=sent)
    if expect(out, response, "feedback on a completion"):
        for problem in feedback_problems(sent, response.json(), user):
            out.fail(problem)
    roll = rng.random()
    if roll < 0.15:
        expect(out, await ctx.client.post("/v1/feedback", json={"completion_id": f"chatcmpl-{uuid.uuid4().hex}",
                                                                "rating": "up"}),
               "feedback on an unknown completion", 404)
    elif roll < 0.3:
        expect(out, await ctx.client.post("/v1/feedback", json={"completion_id": completions[0],
                                                                "preferred_over": completions[0]}),
               "a completion preferred over itself", 400)
    elif roll < 0.4:
        expect(out, await ctx.client.post("/v1/feedback", json={"completion_id": completions[0]}),
               "feedback without a rating, a choice or a comment", 400)
    response = await ctx.client.delete(path)
    if expect(out, response, "DELETE a profile") and \
            response.json() != {"object": "user.preferences.deleted", "user": user, "deleted": True}:
        out.fail(f"DELETE a profile answered {response.json()}")
    expect(out, await ctx.client.get(path), "GET a deleted profile", 404, "user_not_found")
    expect(out, await ctx.client.delete(path), "DELETE a deleted profile", 404, "user_not_found")
    if rng.random() < 0.3:  # no profile now: plain decoding
        data = await chat_as(ctx, out, {"model": ctx.model, "user": user, "messages": messages, "max_tokens": 8},
                             f"a chat as {user} after the profile's delete")
        if data is not None and (data.get("pad") or {}).get("source") != "none":
            out.fail(f"a chat as {user} after the profile's delete: pad {data.get('pad')}")
    out.answered = not out.violations


async def chat_as(ctx: Context, out: Outcome, body: dict, what: str) -> dict | None:
    """A non-streamed chat that must be answered (check_answer); its text,
    finish reason and tokens added to the scenario's."""
    texts, reasons, tokens = out.texts, out.finish_reasons, out.completion_tokens
    response = await ctx.client.post("/v1/chat/completions", json=body)
    if not expect(out, response, what):
        return None
    data = response.json()
    out.completion_tokens = 0
    check_answer(out, data, body, 1, lambda choice: choice["message"]["content"])
    out.texts, out.finish_reasons, out.completion_tokens = \
        texts + out.texts, reasons + out.finish_reasons, tokens + out.completion_tokens
    return data


# ---- Anthropic's Messages API ---------------------------------------------
ANTHROPIC_STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence"}


def anthropic_status(out: Outcome, response: httpx.Response) -> bool:
    """record_status for the Anthropic routes: their errors are Anthropic-shaped."""
    out.status = response.status_code
    if response.status_code == 200:
        return True
    try:
        body = response.json()
        shaped = body["type"] == "error" and isinstance(body["error"]["message"], str) and body["error"]["type"]
    except (ValueError, KeyError, TypeError):
        shaped = False
    if not shaped:
        out.fail(f"{response.status_code} error body not Anthropic-shaped: {response.text[:120]!r}")
    return False


def check_message(out: Outcome, body: dict, text: str, stop_reason: str | None, stop_sequence: str | None,
                  output_tokens: object) -> None:
    """What any answer of /v1/messages must be: a stop reason that fits its
    tokens, no stop sequence in its text, the one matched named."""
    check_text(out, text, {"stop": body.get("stop_sequences")})
    if stop_reason not in ANTHROPIC_STOP_REASONS:
        out.fail(f"stop_reason {stop_reason!r}")
    if not isinstance(output_tokens, int) or output_tokens > body["max_tokens"] or (
            stop_reason == "max_tokens" and output_tokens != body["max_tokens"]):
        out.fail(f"output_tokens {output_tokens} for max_tokens {body['max_tokens']}, stop_reason {stop_reason}")
    if (stop_reason == "stop_sequence") != (stop_sequence is not None) or (
            stop_sequence is not None and stop_sequence not in body.get("stop_sequences", ())):
        out.fail(f"stop_sequence {stop_sequence!r} with stop_reason {stop_reason!r}")
    out.completion_tokens = output_tokens if isinstance(output_tokens, int) else 0
    out.finish_reasons.append({"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(
        stop_reason, str(stop_reason)))
    out.texts.append(text)


async def anthropic_messages(ctx: Context, out: Outcome) -> None:
    """POST /v1/messages, streamed or not: an answer (the stream's events in
    order, its text deltas adding up) whose stop reason and tokens agree."""
    rng = ctx.rng
    body = out.request = {"model": ctx.model, "max_tokens": rng.randint(1, ctx.max_tokens_cap),
                          "messages": [{"role": "user", "content": a_prompt(rng)}]}
    if rng.random() < 0.3:
        body["system"] = "Answer briefly."
    if rng.random() < 0.2:
        body["stop_sequences"] = rng.sample(STOPS, rng.randint(1, 2))
    personalise(body, rng)
    if rng.random() < 0.5:
        body["temperature"] = rng.choice([0, 0.7])
    if rng.random() < 0.5:
        response = await ctx.client.post("/v1/messages", json=body)
        if not anthropic_status(out, response):
            return
        data = response.json()
        blocks = data.get("content") or []
        if data.get("type") != "message" or [b.get("type") for b in blocks] != ["text"]:
            out.fail(f"not a message of one text block: {str(data)[:120]}")
            return
        check_message(out, body, blocks[0]["text"], data.get("stop_reason"), data.get("stop_sequence"),
                      (data.get("usage") or {}).get("output_tokens"))
        out.answered = not out.violations
        return
    body["stream"] = True
    async with ctx.client.stream("POST", "/v1/messages", json=body) as response:
        if response.status_code != 200:
            await response.aread()
        if not anthropic_status(out, response):
            return
        kinds, text, end = [], "", {}
        async for name, raw in sse_events(response):
            if out.ttft is None:
                out.ttft = ctx.now() - out.started
            event = json.loads(raw)
            kinds.append(name)
            if name != event.get("type"):
                out.fail(f"event {name!r} carries type {event.get('type')!r}")
            if name == "error":
                out.stream_error = event.get("error")
                return
            if name == "content_block_delta":
                text += event["delta"].get("text", "")
            if name == "message_delta":
                end = event
    order = [k for k in kinds if k != "ping"]
    if not order or order[0] != "message_start" or order[-2:] != ["message_delta", "message_stop"] or (
            order.count("content_block_start") != order.count("content_block_stop")):
        out.fail(f"event order {order[:3]}...{order[-3:]}")
        return
    check_message(out, body, text, end["delta"].get("stop_reason"), end["delta"].get("stop_sequence"),
                  (end.get("usage") or {}).get("output_tokens"))
    out.answered = not out.violations


Scenario = Callable[[Context, Outcome], Awaitable[None]]
SCENARIOS: dict[str, tuple[Scenario, float]] = {
    "chat": (chat_plain, 20),
    "chat_stream": (chat_stream, 25),
    "completions": (text_completion, 10),
    "responses_stream": (responses_stream, 10),
    "json_schema": (structured_output, 5),
    "vllm_constraint": (vllm_constraint, 5),
    "vllm_tokens": (vllm_tokens, 3),
    "tools_auto": (tools_auto, 5),
    "multi_turn": (multi_turn, 5),
    "hang_up_mid_stream": (hang_up_mid_stream, 8),
    "hang_up_mid_prefill": (hang_up_mid_prefill, 7),
    "invalid": (invalid_request, 10),
    "stored_responses": (stored_responses, 5),
    "conversation": (conversation, 5),
    "conversation_race": (conversation_race, 3),
    "conversation_hang_up": (conversation_hang_up, 3),
    "conversation_delete_mid_stream": (conversation_delete_mid_stream, 2),
    "user_preferences": (user_preferences, 4),
    "anthropic_messages": (anthropic_messages, 5),
}


async def run_one(ctx: Context, name: str, timeout: float) -> Outcome:
    out = Outcome(name, started=ctx.now())
    try:
        await asyncio.wait_for(SCENARIOS[name][0](ctx, out), timeout)
    except TimeoutError:
        out.transport_error = f"no answer in {timeout:.0f} s (a hang)"
    except httpx.HTTPError as exc:
        out.transport_error = f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, TypeError) as exc:  # a body we could not read: the server's fault
        out.fail(f"unreadable answer: {type(exc).__name__}: {exc}")
    out.ended = ctx.now()
    return out


# ---- processes and metrics ---------------------------------------------
def gateway_process(base_url: str, pid: int | None) -> psutil.Process | None:
    """The given pid, else the process listening on the URL's port."""
    if pid:
        return psutil.Process(pid)
    port = urlparse(base_url).port or 80
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def worker_process(gateway: psutil.Process | None, pid: int | None) -> psutil.Process | None:
    """The given pid, else the gateway's child running pad_core.worker."""
    if pid:
        try:
            return psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None
    if gateway is None:
        return None
    try:
        for child in gateway.children(recursive=True):
            if "pad_core.worker" in " ".join(child.cmdline()):
                return child
    except psutil.Error:
        pass
    return None


def rss_mib(process: psutil.Process | None) -> float | None:
    try:
        return process.memory_info().rss / 2**20 if process is not None else None
    except psutil.Error:
        return None


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


@dataclass
class Sample:
    t: float
    requests: int
    gateway_pid: int | None
    gateway_mib: float | None
    worker_pid: int | None
    worker_mib: float | None


class Monitor:
    """Samples the RSS of the gateway and the worker every `every` seconds."""

    def __init__(self, ctx: Context, gateway: psutil.Process | None, worker_pid: int | None, every: float):
        self.ctx, self.gateway, self.worker_pid, self.every = ctx, gateway, worker_pid, every
        self.worker = worker_process(gateway, worker_pid)
        self.samples: list[Sample] = []
        self.completed = 0  # requests ended so far (the runner counts)

    def sample(self) -> None:
        if self.worker is None or not self.worker.is_running():
            self.worker = worker_process(self.gateway, None)  # a restarted worker: the gateway's new child
        self.samples.append(Sample(self.ctx.now(), self.completed,
                                   self.gateway.pid if self.gateway else None, rss_mib(self.gateway),
                                   self.worker.pid if self.worker else None, rss_mib(self.worker)))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)


def growth_per_1000(samples: list[Sample], which: str, warmup_share: float) -> tuple[float | None, int]:
    """Least-squares slope of RSS (MiB) over requests completed, x 1000,
    over the samples after the warm-up, of the last process seen (a
    restarted worker starts its own line). (slope, samples used)."""
    pid_of = f"{which}_pid"
    mib_of = f"{which}_mib"
    points = [s for s in samples if getattr(s, mib_of) is not None]
    if not points:
        return None, 0
    last_pid = getattr(points[-1], pid_of)
    points = [s for s in points if getattr(s, pid_of) == last_pid]
    points = points[int(len(points) * warmup_share):]
    xs = [s.requests for s in points]
    ys = [getattr(s, mib_of) for s in points]
    if len(points) < 3 or max(xs) == min(xs):
        return None, len(points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope * 1000, len(points)


# ---- the worker kill -----------------------------------------------------
@dataclass
class Kill:
    at: float | None = None
    pid: int | None = None
    down_seen: float | None = None
    recovered: float | None = None


async def kill_worker(ctx: Context, monitor: Monitor, after: float, kill: Kill, health_client: httpx.AsyncClient,
                      recovery_limit: float) -> None:
    await asyncio.sleep(max(0.0, after - ctx.now()))
    worker = worker_process(monitor.gateway, monitor.worker_pid)
    if worker is None:
        print("soak: no worker process found to kill", file=sys.stderr)
        return
    kill.pid = worker.pid
    os.kill(worker.pid, signal.SIGKILL)
    kill.at = ctx.now()
    print(f"[{kill.at:7.1f}s] SIGKILL worker pid {worker.pid}", flush=True)
    while ctx.now() - kill.at < recovery_limit:
        try:
            status = (await health_client.get("/health")).status_code
        except httpx.HTTPError:
            status = None
        if status != 200 and kill.down_seen is None:
            kill.down_seen = ctx.now()
        elif status == 200 and kill.down_seen is not None:
            kill.recovered = ctx.now()
            print(f"[{kill.recovered:7.1f}s] /health is 200 again ({kill.recovered - kill.at:.1f} s after the kill)",
                  flush=True)
            return
        await asyncio.sleep(0.1)
    print(f"soak: /health not back to 200 in {recovery_limit:.0f} s", file=sys.stderr)


def reached_by_kill(out: Outcome, kill: Kill, grace: float = 1.0) -> bool:
    """In flight when the worker was killed, or sent while it was down."""
    if kill.at is None:
        return False
    back = kill.recovered if kill.recovered is not None else math.inf
    return out.started <= back + grace and out.ended >= kill.at


# ---- the run -------------------------------------------------------------
async def client_loop(ctx: Context, deadline: float, outcomes: list[Outcome], monitor: Monitor, timeout: float,
                      names: list[str], weights: list[float], first_round: list[str]) -> None:
    while first_round or ctx.now() < deadline:
        # Every scenario runs once (past the deadline if need be) before the weighted draw
        # takes over, so a short soak (CI's few seconds) covers the rare ones whatever the luck.
        name = first_round.pop() if first_round else ctx.rng.choices(names, weights)[0]
        outcome = await run_one(ctx, name, timeout)
        outcomes.append(outcome)
        monitor.completed += 1
        await asyncio.sleep(ctx.rng.uniform(0, 0.3))


async def wait_idle_gauges(client: httpx.AsyncClient, limit: float) -> tuple[dict[str, float], float | None]:
    """Polls /metrics until every gauge is 0; (last values, seconds it took or None)."""
    start = time.monotonic()
    values: dict[str, float] = {}
    while time.monotonic() - start < limit:
        values = {name: (await scrape(client)).get(name, math.nan) for name in GAUGES}
        if all(v == 0 for v in values.values()):
            return values, time.monotonic() - start
        await asyncio.sleep(0.5)
    return values, None


async def soak(args: argparse.Namespace) -> int:
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 4)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=timeout, limits=limits) as client, \
            httpx.AsyncClient(base_url=args.base_url, timeout=5.0) as probe:
        if (await probe.get("/health")).status_code != 200:
            print("soak: the server is not healthy", file=sys.stderr)
            return 2
        model = args.model or (await probe.get("/v1/models")).json()["data"][0]["id"]
        before = await scrape(probe)
        ctx = Context(client, model, random.Random(args.seed), time.monotonic(), args.max_tokens)
        gateway = gateway_process(args.base_url, args.gateway_pid)
        monitor = Monitor(ctx, gateway, args.worker_pid, args.sample_every)
        print(f"soak: {args.duration:.0f} s, {args.concurrency} clients, model {model}, gateway pid "
              f"{gateway.pid if gateway else '?'}, worker pid {monitor.worker.pid if monitor.worker else '?'}",
              flush=True)
        names = [n for n in SCENARIOS if n not in args.skip]
        weights = [SCENARIOS[n][1] for n in names]
        first_round = ctx.rng.sample(names, len(names))
        outcomes: list[Outcome] = []
        kill = Kill()
        monitor_task = asyncio.create_task(monitor.run())
        progress_task = asyncio.create_task(progress(ctx, outcomes, monitor, args.progress_every))
        kill_task = None
        if args.kill_worker_after is not None:
            kill_task = asyncio.create_task(kill_worker(ctx, monitor, args.kill_worker_after, kill, probe,
                                                        args.recovery_limit))
        await asyncio.gather(*(client_loop(ctx, args.duration, outcomes, monitor, args.request_timeout + 30,
                                           names, weights, first_round) for _ in range(args.concurrency)))
        load_seconds = ctx.now()
        if kill_task is not None:
            await kill_task
        progress_task.cancel()
        await asyncio.sleep(args.idle_settle)  # the server idles; aborts and heartbeats settle
        gauges, settled_in = await wait_idle_gauges(probe, args.idle_limit)
        monitor.sample()
        monitor_task.cancel()
        after = await scrape(probe)
        health = (await probe.get("/health")).status_code
    report = Report(args, outcomes, monitor.samples, kill, gauges, settled_in, before, after, load_seconds, health)
    ok = report.print()
    if args.answers_out:
        with open(args.answers_out, "w", encoding="utf-8") as f:
            for out in outcomes:
                f.write(json.dumps(asdict(out), ensure_ascii=False) + "\n")
    if args.samples_out:
        with open(args.samples_out, "w", encoding="utf-8") as f:
            json.dump([asdict(s) for s in monitor.samples], f)
    return 0 if ok else 1


async def progress(ctx: Context, outcomes: list[Outcome], monitor: Monitor, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        last = monitor.samples[-1] if monitor.samples else None
        bad = sum(1 for o in outcomes if o.violations or o.transport_error or (o.status or 0) >= 500)
        print(f"[{ctx.now():7.1f}s] {len(outcomes)} requests, {bad} flagged; RSS gateway "
              f"{fmt(last.gateway_mib if last else None)} MiB, worker {fmt(last.worker_mib if last else None)} MiB",
              flush=True)


def fmt(value: float | None, digits: int = 0) -> str:
    return "?" if value is None else f"{value:.{digits}f}"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---- the report ----------------------------------------------------------
@dataclass
class Report:
    args: argparse.Namespace
    outcomes: list[Outcome]
    samples: list[Sample]
    kill: Kill
    gauges: dict[str, float]
    settled_in: float | None
    before: dict[str, float]
    after: dict[str, float]
    load_seconds: float
    health: int
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {message}")
        if not ok:
            self.failures.append(message)

    def print(self) -> bool:
        outs = self.outcomes
        print(f"\n=== soak report: {len(outs)} requests in {self.load_seconds:.0f} s ===")
        kinds = Counter(o.scenario for o in outs)
        print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        statuses = Counter(str(o.status) if o.status is not None else ("cancelled" if o.cancelled else "none")
                           for o in outs)
        print("statuses seen by the client: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
        self.print_server_counts()
        print("\ninvariants:")
        self.check_errors()
        self.check_answers()
        self.check_gauges()
        if self.args.kill_worker_after is not None:
            self.check_kill()
        self.check(self.health == 200, f"/health at the end: {self.health}")
        self.print_rss()
        self.print_speed()
        self.print_samples()
        print(f"\nRESULT: {'PASS' if not self.failures else 'FAIL (' + str(len(self.failures)) + ')'}")
        return not self.failures

    def print_server_counts(self) -> None:
        counts = {}
        for name, value in self.after.items():
            if name.startswith("pad_requests_total{"):
                status = name.split('"')[1]
                counts[status] = value - self.before.get(name, 0)
        print("statuses counted by the server (pad_requests_total delta): "
              + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(counts.items())))
        restarts = self.after.get("pad_worker_restarts_total", 0) - self.before.get("pad_worker_restarts_total", 0)
        print(f"worker restarts: {restarts:.0f}")

    def check_errors(self) -> None:
        kill = self.kill
        server_errors = [o for o in self.outcomes if (o.status or 0) >= 500 and not reached_by_kill(o, kill)]
        transport = [o for o in self.outcomes if o.transport_error and not reached_by_kill(o, kill)]
        stream_errors = [o for o in self.outcomes if o.stream_error and not reached_by_kill(o, kill)]
        self.check(not server_errors, f"5xx outside a worker kill: {len(server_errors)}"
                   + summary(server_errors, lambda o: f"{o.scenario} {o.status}"))
        self.check(not transport, f"transport errors / hangs outside a worker kill: {len(transport)}"
                   + summary(transport, lambda o: f"{o.scenario}: {o.transport_error}"))
        self.check(not stream_errors, f"stream error events outside a worker kill: {len(stream_errors)}"
                   + summary(stream_errors, lambda o: f"{o.scenario}: {o.stream_error}"))
        invalid = [o for o in self.outcomes if o.expected_4xx and not reached_by_kill(o, kill)]
        wrong = [o for o in invalid if not (o.status and 400 <= o.status < 500) or o.violations]
        self.check(not wrong, f"invalid requests answered 4xx, OpenAI-shaped: {len(invalid) - len(wrong)} "
                              f"of {len(invalid)}" + summary(wrong, lambda o: f"{o.request} -> {o.status}"))

    def check_answers(self) -> None:
        answered = [o for o in self.outcomes if o.answered]
        bad = [o for o in self.outcomes if o.violations and not o.expected_4xx]
        reasons = Counter(r for o in answered for r in o.finish_reasons)
        self.check(not bad, f"answers with finish_reason, usage, text, events all consistent: {len(answered)} "
                            f"({dict(reasons)}); violations: {len(bad)}"
                   + summary(bad, lambda o: f"{o.scenario}: {o.violations[0]}", 8))
        cancelled = sum(1 for o in self.outcomes if o.cancelled)
        print(f"  [info] requests we hung up on: {cancelled}")
        odd = [o for o in answered if o.replacement_chars]
        print(f"  [info] answers holding U+FFFD (byte tokens that do not make a character): {len(odd)}"
              + summary(odd, lambda o: repr(next(t for t in o.texts if "\ufffd" in t)[-50:])))

    def check_gauges(self) -> None:
        took = f"in {self.settled_in:.1f} s" if self.settled_in is not None else f"not within {self.args.idle_limit} s"
        self.check(all(v == 0 for v in self.gauges.values()),
                   "idle gauges back to 0 " + took + ": " + ", ".join(f"{k}={v:g}" for k, v in self.gauges.items()))

    def check_kill(self) -> None:
        kill = self.kill
        if kill.at is None:
            self.check(False, "the worker was killed")
            return
        self.check(kill.recovered is not None,
                   f"/health back to 200 after the kill: {fmt(None if kill.recovered is None else kill.recovered - kill.at, 1)} s")
        in_flight = [o for o in self.outcomes if o.started <= kill.at <= o.ended and not o.expected_4xx]
        hung = [o for o in in_flight if o.ended - kill.at > self.args.hang_limit]
        ends = Counter("200 answered" if o.answered else "cancelled" if o.cancelled else
                       f"stream error {(o.stream_error or {}).get('code')}" if o.stream_error else
                       f"transport: {o.transport_error}" if o.transport_error else str(o.status)
                       for o in in_flight)
        slowest = max((o.ended - kill.at for o in in_flight), default=0.0)
        self.check(not hung and not any(o.transport_error for o in in_flight),
                   f"requests in flight at the kill: {len(in_flight)}, ended as {dict(ends)}, "
                   f"the last {slowest:.1f} s after the kill (limit {self.args.hang_limit:.0f} s)")
        reached = [o for o in self.outcomes if reached_by_kill(o, kill)]
        odd = [o for o in reached if (o.status or 0) >= 500 and o.status != 503]
        self.check(not odd, f"requests reached by the kill failed only with 503: {len(reached)} reached"
                   + summary(odd, lambda o: f"{o.scenario} {o.status}"))
        after = [o for o in self.outcomes if kill.recovered is not None and o.started > kill.recovered and o.answered]
        self.check(bool(after), f"answers after recovery: {len(after)}")

    def print_rss(self) -> None:
        samples = self.samples
        if not samples:
            return
        print(f"\nRSS ({len(samples)} samples every {self.args.sample_every:.0f} s; growth by least squares over "
              f"requests completed, after the first {self.args.warmup_share:.0%} of the samples):")
        for which in ("gateway", "worker"):
            values = [getattr(s, f"{which}_mib") for s in samples if getattr(s, f"{which}_mib") is not None]
            if not values:
                print(f"  {which}: not found")
                continue
            growth, used = growth_per_1000(samples, which, self.args.warmup_share)
            pids = len({getattr(s, f"{which}_pid") for s in samples if getattr(s, f"{which}_mib") is not None})
            restarted = f", {pids} processes: the fit is over the last" if pids > 1 else ""
            print(f"  {which}: start {values[0]:.0f} MiB, idle after the load {values[-1]:.0f} MiB, "
                  f"max {max(values):.0f} MiB; growth {fmt(growth, 1)} MiB per 1,000 requests ({used} samples"
                  f"{restarted})")

    def print_speed(self) -> None:
        answered = [o for o in self.outcomes if o.answered]
        tokens = sum(o.completion_tokens for o in answered)
        print(f"\nspeed: {tokens} completion tokens in {self.load_seconds:.0f} s = "
              f"{tokens / max(self.load_seconds, 1e-9):.1f} tok/s aggregate; "
              f"{len(answered) / max(self.load_seconds, 1e-9):.2f} answers/s")
        for label, values in (("latency (answered)", [o.latency for o in answered]),
                              ("time to first event (streams)", [o.ttft for o in answered if o.ttft is not None])):
            print(f"  {label}: p50 {fmt(pct(values, 0.5), 2)} s, p99 {fmt(pct(values, 0.99), 2)} s, "
                  f"max {fmt(max(values, default=None), 2)} s (n={len(values)})")
        rates = [(o.completion_tokens - 1) / (o.ended - o.started - o.ttft) for o in answered
                 if o.ttft is not None and o.completion_tokens > 8 and o.ended - o.started - o.ttft > 0]
        print(f"  per-stream decode rate after the first token: p50 {fmt(pct(rates, 0.5), 1)} tok/s (n={len(rates)})")

    def print_samples(self) -> None:
        answered = [o for o in self.outcomes if o.answered and any(o.texts)]
        if not answered or not self.args.show:
            return
        print(f"\n{min(self.args.show, len(answered))} answers at random:")
        for out in random.Random(1).sample(answered, min(self.args.show, len(answered))):
            request = out.request
            prompt = request.get("messages", [{}])[-1].get("content") if "messages" in request else \
                request.get("prompt") or request.get("input")
            extras = {k: request[k] for k in ("preference", "pad", "stop", "n", "temperature") if k in request}
            print(f"--- {out.scenario} {extras} finish={out.finish_reasons} tokens={out.completion_tokens}")
            print(f"    prompt: {str(prompt)[-90:]!r}")
            for text in out.texts:
                print(f"    answer: {text!r}")


def summary(items: list[Outcome], describe: Callable[[Outcome], str], limit: int = 4) -> str:
    if not items:
        return ""
    shown = "; ".join(describe(o) for o in items[:limit])
    return f" (e.g. {shown}{' ...' if len(items) > limit else ''})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="the served model (default: the first of /v1/models)")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=5, help="clients sending at once")
    parser.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SCENARIOS), help="scenarios left out")
    parser.add_argument("--gateway-pid", type=int, help="default: the process listening on the URL's port")
    parser.add_argument("--worker-pid", type=int, help="default: the gateway's pad_core.worker child")
    parser.add_argument("--kill-worker-after", type=float, help="SIGKILL the worker this many seconds into the load")
    parser.add_argument("--hang-limit", type=float, default=30.0,
                        help="seconds after a kill by which the requests in flight must have ended")
    parser.add_argument("--recovery-limit", type=float, default=120.0, help="seconds /health may take to recover")
    parser.add_argument("--request-timeout", type=float, default=240.0, help="httpx timeout; more is a hang")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period (s)")
    parser.add_argument("--warmup-share", type=float, default=0.2, help="RSS samples left out of the growth fit")
    parser.add_argument("--progress-every", type=float, default=60.0)
    parser.add_argument("--idle-settle", type=float, default=2.0, help="seconds of idle before reading the gauges")
    parser.add_argument("--idle-limit", type=float, default=30.0, help="seconds the gauges may take to reach 0")
    parser.add_argument("--show", type=int, default=5, help="answers printed at the end")
    parser.add_argument("--answers-out", help="JSONL of every request's outcome (requests, answers, checks)")
    parser.add_argument("--samples-out", help="JSON of the RSS samples")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(soak(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
