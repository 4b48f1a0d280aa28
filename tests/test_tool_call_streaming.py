"""Tool calls streamed as they are generated (server.generation.CallStream):
each call announced once its name is written, its arguments in fragments
that add up to the arguments of the whole answer, a repeat the engine drops
never sent, an answer cut short keeping what was sent.

First as pure data on ChoiceState (synthetic engine outputs, the engine's
repeat check and parser from pad_core.structured, any split of the text),
then over HTTP with the official openai SDK's own stream accumulators on
the tiny model, each streamed answer compared with the same answer whole."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from server_helpers import tiny_gateway

from pad_core.structured import CallListScanner, parse_tool_calls
from pad_core.types import StepOutput, StructuredOutput, TokenLogprob, ToolCall, ToolFunction
from server.generation import CallDelta, CallTextScanner, ChoiceState, Delta

FORCED = StructuredOutput("tool_calls", tools=(ToolFunction("f"), ToolFunction("g")))
AUTO = StructuredOutput("tool_calls", tools=(ToolFunction("f"), ToolFunction("g")), auto=True)


# ---- pure: ChoiceState over synthetic outputs -------------------------------
def step(text: str, finish: str | None = None, calls: list[ToolCall] | None = None,
         logprob: bool = False) -> StepOutput:
    logprobs = [TokenLogprob(text, -0.5, list(text.encode()))] if logprob else None
    return StepOutput("r", [7], text, finish, 3, 1, logprobs=logprobs, tool_calls=calls)


def engine_outputs(pieces: list[str], finish: str = "stop") -> list[StepOutput]:
    """The outputs the engine sends for an answer written in `pieces`: its
    repeat check sees each piece and ends the answer at the first repeat
    (with the calls before it); else the last piece ends it, with the
    calls parsed from the whole text when it finished "stop"."""
    scanner, outputs, text = CallListScanner(), [], ""
    for index, piece in enumerate(pieces):
        text += piece
        if scanner.feed(piece):
            return [*outputs, step(piece, "stop", scanner.calls)]
        if index == len(pieces) - 1:
            calls = parse_tool_calls(text.lstrip()) if finish == "stop" else None
            return [*outputs, step(piece, finish, calls)]
        outputs.append(step(piece))
    raise AssertionError("no pieces")


class Accumulated:
    """What a client holds after a stream of call deltas, built the way
    OpenAI's stream accumulators build it, with every rule of the wire
    checked on the way: the first delta of a call is its announcement, at
    the next index, and nothing follows a call's `done`."""

    def __init__(self):
        self.calls: list[dict] = []
        self.done: list[int] = []

    def take(self, deltas: list[CallDelta]) -> None:
        for delta in deltas:
            if delta.name is not None:
                assert delta.index == len(self.calls) and delta.arguments == "" and delta.id.startswith("call_")
                self.calls.append({"id": delta.id, "name": delta.name, "arguments": ""})
                continue
            call = self.calls[delta.index]
            assert delta.id == call["id"] and delta.index not in self.done
            call["arguments"] += delta.arguments
            if delta.done:
                assert not delta.arguments and delta.index == len(self.done)
                self.done.append(delta.index)


def run(choice: ChoiceState, outputs: list[StepOutput]) -> tuple[Accumulated, list[Delta]]:
    client, deltas = Accumulated(), []
    for output in outputs:
        delta = choice.update(output)
        client.take(delta.calls)
        deltas.append(delta)
    return client, deltas


def assert_streamed_as_whole(choice: ChoiceState, client: Accumulated) -> None:
    """The streamed calls are the answer's calls, ids included."""
    assert choice.finish_reason == "tool_calls"
    assert [(c["id"], c["name"], c["arguments"]) for c in client.calls] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in choice.tool_calls]
    assert client.done == list(range(len(client.calls)))


def test_a_call_is_announced_once_its_name_is_written_then_its_arguments_stream():
    choice = ChoiceState.of(0, FORCED)
    client = Accumulated()
    pieces = ['[{"name": "', 'f', '", "arg', 'uments": {"a', '": [1, "}"', ']}}, {"name": "g", "arguments": {}}', "]"]
    announced_at = None
    for index, output in enumerate(engine_outputs(pieces)):
        delta = choice.update(output)
        client.take(delta.calls)
        if client.calls and announced_at is None:
            announced_at = index
    assert announced_at == 2  # the name's closing quote, not before
    assert_streamed_as_whole(choice, client)
    assert [c["arguments"] for c in client.calls] == ['{"a": [1, "}"]}', "{}"]


def test_one_calls_object_and_leading_space_with_tool_choice_auto():
    choice = ChoiceState.of(0, AUTO)
    assert not choice.update(step(" "))  # undecided
    client, deltas = run(choice, engine_outputs(['\n{"name": "g", "arguments": {"x": 1', "0}}"]))
    assert_streamed_as_whole(choice, client)
    assert client.calls[0]["arguments"] == '{"x": 10}' and deltas[-1].finish_reason == "tool_calls"


def test_a_repeated_call_is_never_sent_not_even_its_name():
    first = '{"name": "f", "arguments": {"a": 1}}'
    text = f'[{first}, {{"name": "f", "arguments": {{"a": 12}}}}, {first}, {{"name": "g", "arguments": {{}}}}]'
    choice = ChoiceState.of(0, FORCED)
    outputs = engine_outputs(list(text))  # a character at a time: every prefix of the repeat is seen
    assert outputs[-1].tool_calls == [ToolCall("f", '{"a": 1}'), ToolCall("f", '{"a": 12}')]
    client, _ = run(choice, outputs)
    assert_streamed_as_whole(choice, client)
    assert [c["arguments"] for c in client.calls] == ['{"a": 1}', '{"a": 12}']


def test_a_call_held_as_a_possible_repeat_goes_out_whole_once_it_differs():
    first = '[{"name": "f", "arguments": {"a": 1}}, '
    choice = ChoiceState.of(0, FORCED)
    assert [d.arguments for d in choice.update(step(first)).calls if d.arguments] == ['{"a": 1}']
    assert not choice.update(step('{"name": "f", "arguments": {"a": 1')).calls  # still a prefix of the first
    announced, fragment = choice.update(step("5")).calls
    assert (announced.index, announced.name, fragment.arguments) == (1, "f", '{"a": 15')


def test_an_answer_cut_by_max_tokens_keeps_what_was_sent_and_ends_with_length():
    choice = ChoiceState.of(0, FORCED)
    client, deltas = run(choice, engine_outputs(['[{"name": "f", "arguments": {"a": "x', 'yz'], finish="length"))
    assert client.calls[0]["arguments"] == '{"a": "xyz' and client.done == []  # unfinished, as sent
    assert deltas[-1].finish_reason == "length" and deltas[-1].text == "" and not deltas[-1].logprobs
    assert choice.tool_calls is None and choice.text == ""  # whole: the call begun, never the calls' JSON as text
    assert choice.answer_calls == [{"id": client.calls[0]["id"], "type": "function",
                                    "function": {"name": "f", "arguments": '{"a": "xyz'}}]
    before_a_name = ChoiceState.of(0, FORCED)  # no call named yet: an empty answer, streamed or not
    client, deltas = run(before_a_name, engine_outputs(['[{"na', 'me": "f'], finish="length"))
    assert client.calls == [] and deltas[-1].text == "" and deltas[-1].finish_reason == "length"
    assert before_a_name.answer_calls == [] and before_a_name.text == ""


def test_a_stop_string_that_cuts_the_text_but_not_the_calls():
    """The engine parses its tokens, not the text after the stop matcher:
    calls complete in the tokens end the answer, their tail sent at the end."""
    choice = ChoiceState.of(0, FORCED)
    calls = [ToolCall("f", '{"a": 1}')]
    client, _ = run(choice, [step('[{"name": "f", "arguments": {"a": 1'), step("", "stop", calls)])
    assert_streamed_as_whole(choice, client)
    assert client.calls[0]["arguments"] == '{"a": 1}'


def test_calls_carry_no_logprobs_whole_or_cut():
    choice = ChoiceState.of(0, FORCED)
    _, deltas = run(choice, [step('[{"name": "f", ', logprob=True),
                             step('"arguments": {}}]', "stop", [ToolCall("f", "{}")], logprob=True)])
    assert all(not d.logprobs for d in deltas) and choice.logprobs == []
    cut = ChoiceState.of(0, FORCED)
    _, deltas = run(cut, [step("[", logprob=True), step('{"', "length", logprob=True)])
    assert all(not d.logprobs for d in deltas) and cut.logprobs == []


def test_each_choice_keeps_its_own_ids():
    outputs = engine_outputs(['[{"name": "f", "arguments": {}}, ', '{"name": "g", "arguments": {}}]'])
    first, second = ChoiceState.of(0, FORCED), ChoiceState.of(1, FORCED)
    for choice in (first, second):
        client, _ = run(choice, outputs)
        assert_streamed_as_whole(choice, client)
    ids = [c["id"] for choice in (first, second) for c in choice.tool_calls]
    assert len(set(ids)) == 4


def test_the_scanner_finds_names_and_arguments_as_written():
    scanner = CallTextScanner()
    text = '[{"name": "f", "arguments": {"s": "\\"}]{", "n": [1.00, -0]}}, {"arguments": 7, "name": "g"}]'
    for char in text:
        scanner.feed(char)
    assert [(c.name, scanner.arguments(c)) for c in scanner.calls] == \
        [("f", '{"s": "\\"}]{", "n": [1.00, -0]}'), ("g", "7")]  # a number ends at the character after it
    assert [scanner.written(c) for c in scanner.calls] == \
        ['{"name": "f", "arguments": {"s": "\\"}]{", "n": [1.00, -0]}}', '{"arguments": 7, "name": "g"}']


def test_arguments_are_the_text_as_written_and_a_repeat_is_the_same_text():
    """JSON writes one value several ways, and the grammar allows some
    (llguidance: `1.00`, `"\\u0009"` for a tab, an open object's keys in
    any order): the arguments are the model's text (what was streamed),
    and only the same text is a repeat (a call already sent is never dropped)."""
    text = '[{"name": "f", "arguments": {"a": 1.0, "t": "\\t"}}, {"name": "f", "arguments": {"t": "\\u0009", "a": 1.00}}]'
    assert parse_tool_calls(text) == [ToolCall("f", '{"a": 1.0, "t": "\\t"}'),
                                      ToolCall("f", '{"t": "\\u0009", "a": 1.00}')]
    assert not CallListScanner().feed(text)
    assert parse_tool_calls(' {"name": "f", "arguments": {"k": 1, "k": 2}}') == [ToolCall("f", '{"k": 1, "k": 2}')]


# ---- property: any answer, any split -----------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-50, 50), st.sampled_from(["1.00", "-0", "1e3"]),
                    st.text(alphabet='ab"\\}]{[,: é🎉\n', max_size=4))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from("xyz"), inner, max_size=2)),
                      max_leaves=5)


def written(value) -> str:
    """JSON as the grammar writes it (json.dumps style), numbers spelled as drawn."""
    if isinstance(value, str) and value in ("1.00", "-0", "1e3"):
        return value
    if isinstance(value, list):
        return "[" + ", ".join(written(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {written(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


@st.composite
def calls_answers(draw) -> str:
    """A calls answer's text: a list of calls drawn from a few (so some
    repeat), or one call's object; any leading whitespace."""
    pool = draw(st.lists(st.tuples(st.sampled_from(["f", "g"]), st.dictionaries(st.sampled_from("ab"), VALUES,
                                                                                  max_size=2)),
                         min_size=1, max_size=3))
    calls = [f'{{"name": "{name}", "arguments": {written(arguments)}}}'
             for name, arguments in draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5))]
    lead = draw(st.sampled_from(["", " ", "\n "]))
    if draw(st.booleans()):
        return lead + calls[0]
    return lead + "[" + ", ".join(calls) + "]"


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(calls_answers(), st.lists(st.integers(0, 10_000), max_size=30), st.sampled_from([FORCED, AUTO]))
def test_any_answer_split_any_way_streams_the_calls_of_the_whole_answer(text, cuts, structured):
    outputs = engine_outputs(split(text, cuts))
    assert outputs[-1].tool_calls is not None
    choice = ChoiceState.of(0, structured)
    client, deltas = run(choice, outputs)
    assert_streamed_as_whole(choice, client)
    assert deltas[-1].finish_reason == "tool_calls" and not any(d.text for d in deltas)
    assert [(c.name, c.arguments) for c in outputs[-1].tool_calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in choice.tool_calls]


@settings(max_examples=300, deadline=None)
@given(calls_answers(), st.lists(st.integers(0, 10_000), max_size=30), st.integers(0, 10_000))
def test_any_answer_cut_anywhere_sends_only_prefixes_of_its_calls(text, cuts, cut):
    whole = engine_outputs(list(text))  # a character at a time: where the engine would end it
    kept = text[:cut % len(whole)]  # before that end: cut, not complete
    whole = whole[-1].tool_calls  # the calls the answer would have had
    if not kept.strip():
        return
    choice = ChoiceState.of(0, FORCED)
    client, deltas = run(choice, engine_outputs(split(kept, cuts), finish="length"))
    assert len(client.calls) <= len(whole) and choice.tool_calls is None and choice.text == ""
    for call, complete in zip(client.calls, whole, strict=False):
        assert call["name"] == complete.name and complete.arguments.startswith(call["arguments"])
    assert deltas[-1].finish_reason == "length" and all(not d.text for d in deltas)
    # the whole answer is what the stream sent: the calls begun
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice.answer_calls] == \
        [(c["name"], c["arguments"]) for c in client.calls]


# ---- over HTTP, with the openai SDK's accumulators -----------------------------
MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "How do I sleep better?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
    "required": ["text", "n"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_gateway(tmp_path_factory.mktemp("calls")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def more_calls(tokenizer) -> dict[str, int]:
    """A logit_bias toward ", " after a call: the tiny model writes several,
    then repeats one (the engine drops it and ends the list)."""
    return {str(tokenizer(t, add_special_tokens=False)["input_ids"][0]): 40 for t in (",", "},")}


def sse(server, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def calls_of(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]


def test_streamed_calls_accumulate_in_the_sdk_to_the_whole_answer(client, server, more_calls):
    ask = dict(model=MODEL, messages=ASK, max_tokens=120, temperature=0, tool_choice="required")
    # a string argument with brackets and quotes in it; several calls, then a repeat that is dropped
    for tools, bias in (([NOTE], {}), ([WEATHER, TIME], more_calls)):
        whole = client.chat.completions.create(**ask, tools=tools, logit_bias=bias).choices[0]
        assert whole.finish_reason == "tool_calls"
        with client.chat.completions.stream(**ask, tools=tools, logit_bias=bias) as stream:
            final = stream.get_final_completion().choices[0]
        assert final.finish_reason == "tool_calls" and final.message.content is None
        assert calls_of(final.message) == calls_of(whole.message)
        assert all(c.id.startswith("call_") for c in final.message.tool_calls)
    assert len(whole.message.tool_calls) >= 2
    chunks = sse(server, {**ask, "tools": [WEATHER, TIME], "logit_bias": more_calls})
    state = ChatCompletionStreamState()
    calls = []
    for chunk in chunks:
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk))
        calls += [c for choice in chunk["choices"] for c in choice["delta"].get("tool_calls") or ()]
    streamed = state.get_final_completion().choices[0].message
    assert calls_of(streamed) == calls_of(whole.message)
    announcements = [c for c in calls if "id" in c]
    assert [c["index"] for c in announcements] == list(range(len(whole.message.tool_calls)))
    assert all(c["function"]["arguments"] == "" and c["type"] == "function" for c in announcements)
    assert [c.id for c in streamed.tool_calls] == [c["id"] for c in announcements]
    fragments = [c for c in calls if "id" not in c]
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in fragments)
    assert len(fragments) > 2 * len(announcements)  # token by token, not one delta per call
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_n_choices_stream_their_calls_each(client, server):
    ask = dict(model=MODEL, messages=ASK, max_tokens=60, temperature=1.0, seed=3, n=2, tools=[WEATHER, TIME],
               tool_choice="required")
    whole = client.chat.completions.create(**ask)
    with client.chat.completions.stream(**ask) as stream:
        streamed = stream.get_final_completion()
    assert [calls_of(c.message) for c in streamed.choices] == [calls_of(c.message) for c in whole.choices]
    ids = [call.id for c in streamed.choices for call in c.message.tool_calls]
    assert len(set(ids)) == len(ids)


def test_an_answer_cut_mid_call_keeps_the_streamed_call_and_ends_with_length(client, server):
    ask = dict(model=MODEL, messages=ASK, temperature=0, tools=[WEATHER], tool_choice="required")
    (complete,) = client.chat.completions.create(**ask, max_tokens=60).choices[0].message.tool_calls
    cut = client.chat.completions.create(**ask, max_tokens=15).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None  # the calls' JSON is never text
    (whole_cut,) = cut.message.tool_calls  # the call begun, its arguments so far, as OpenAI returns one
    chunks = sse(server, {**ask, "max_tokens": 15})
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk))
    (call,) = state.current_completion_snapshot.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments  # announced, its arguments begun
    assert (whole_cut.function.name, whole_cut.function.arguments) == (call.function.name, call.function.arguments)
    assert complete.function.arguments.startswith(call.function.arguments)
    assert complete.function.arguments != call.function.arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


def test_logprobs_with_calls(client, server):
    ask = dict(model=MODEL, messages=ASK, max_tokens=60, temperature=0, tools=[WEATHER], tool_choice="required",
               logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.logprobs.content == []  # calls are not content
    chunks = sse(server, ask)
    assert all(c["choices"][0]["logprobs"] is None for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_functions_api_streams_its_call(client, server):
    ask = dict(model=MODEL, messages=ASK, max_tokens=60, temperature=0, functions=[WEATHER["function"]],
               function_call={"name": "get_weather"})
    whole = client.chat.completions.create(**ask).choices[0]
    chunks = sse(server, ask)
    deltas = [c["choices"][0]["delta"]["function_call"] for c in chunks
              if c["choices"] and "function_call" in c["choices"][0]["delta"]]
    assert deltas[0] == {"name": "get_weather", "arguments": ""} and len(deltas) > 2
    assert all(set(d) == {"arguments"} for d in deltas[1:])
    assert "".join(d["arguments"] for d in deltas) == whole.message.function_call.arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call" == whole.finish_reason


def test_the_responses_stream_adds_each_call_then_its_arguments(client, more_calls):
    tools = [{"type": "function", **t["function"]} for t in (WEATHER, TIME)]
    ask = dict(model=MODEL, input="Weather?", max_output_tokens=60, temperature=0, tools=tools,
               tool_choice="required")
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.status == "completed"
    assert [(o.name, o.arguments) for o in final.output] == [(o.name, o.arguments) for o in whole.output]
    kinds = [e.type for e in events]
    first_delta = kinds.index("response.function_call_arguments.delta")
    assert kinds.index("response.output_item.added") < first_delta < kinds.index("response.function_call_arguments.done")
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.arguments for e in added] == [""] * len(whole.output)
    for index, item in enumerate(final.output):
        fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"
                     and e.output_index == index]
        assert "".join(fragments) == item.arguments and len(fragments) > 1
        (done,) = [e for e in events if e.type == "response.output_item.done" and e.output_index == index]
        assert done.item.call_id == item.call_id == added[index].item.call_id and done.item.status == "completed"
    cut = list(client.responses.create(**{**ask, "max_output_tokens": 15}, stream=True))
    assert cut[-1].type == "response.incomplete"
    (item,) = cut[-1].response.output
    assert item.type == "function_call" and item.status == "incomplete"
    assert item.arguments == "".join(e.delta for e in cut if e.type == "response.function_call_arguments.delta")
