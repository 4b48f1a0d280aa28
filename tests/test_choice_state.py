"""server.generation.ChoiceState, the one bookkeeping of a choice, as pure
data: what a client is sent for each engine output, for free text, forced
tool calls and tool_choice "auto" (held until its first character says
calls or text). The streaming of calls themselves: test_tool_call_streaming.py."""

from __future__ import annotations

from pad_core.types import StepOutput, StructuredOutput, TokenLogprob, ToolCall, ToolFunction
from server.generation import ChoiceState

AUTO = StructuredOutput("tool_calls", tools=(ToolFunction("f"),), auto=True)
FORCED = StructuredOutput("tool_calls", tools=(ToolFunction("f"),))


def output(text: str, finish: str | None = None, calls: list[ToolCall] | None = None, logprob: str | None = None,
           n: int = 1) -> StepOutput:
    logprobs = [TokenLogprob(logprob, -0.5, list(logprob.encode()))] if logprob is not None else None
    return StepOutput("r", [7], text, finish, 3, n, logprobs=logprobs, tool_calls=calls)


def test_auto_text_is_held_only_until_its_first_character():
    choice = ChoiceState.of(0, AUTO)
    assert choice.may_call and not choice.holds_calls
    assert not choice.update(output("", logprob="\xe2"))  # half a character: nothing to decide on yet
    first = choice.update(output("Hé", logprob="llo", n=2))
    assert first.text == "Hé" and [lp.token for lp in first.logprobs] == ["\xe2", "llo"]  # nothing lost
    assert not choice.may_call and not choice.holds_calls
    second = choice.update(output(" there", "stop", n=3))
    assert second.text == " there" and second.finish_reason == "stop" and not second.calls
    assert choice.text == "Hé there" and choice.tool_calls is None and choice.completion_tokens == 3


def test_auto_calls_stream_like_forced_ones():
    calls = [ToolCall("f", "{}")]
    for structured in (AUTO, FORCED):
        choice = ChoiceState.of(0, structured)
        assert not choice.update(output("[{"))  # no name yet: nothing to announce
        announced, fragment, done = choice.update(output('"name": "f", "arguments": {}}')).calls
        assert announced.name == "f" and announced.id.startswith("call_") and announced.arguments == ""
        assert (fragment.index, fragment.id, fragment.name, fragment.arguments) == (0, announced.id, None, "{}")
        assert done.done and not done.on_the_wire
        last = choice.update(output("]", "stop", calls))
        assert last.finish_reason == "tool_calls" and not last.calls and not last.text and choice.text == ""
        assert choice.tool_calls == [{"id": announced.id, "type": "function",
                                      "function": {"name": "f", "arguments": "{}"}}]


def test_auto_calls_cut_by_max_tokens_before_a_name_are_an_empty_answer_and_an_empty_end_is_text():
    choice = ChoiceState.of(0, AUTO)
    assert not choice.update(output("{"))
    last = choice.update(output('"name', "length"))
    assert last.text == "" and last.finish_reason == "length" and choice.tool_calls is None
    assert choice.holds_calls and choice.answer_calls == [] and choice.text == ""  # the calls' JSON is no text
    empty = ChoiceState.of(0, AUTO)  # ended before any text (a stop string at once, say): decided, as text
    last = empty.update(output("", "stop"))
    assert last.finish_reason == "stop" and last.text == "" and not empty.holds_calls and empty.tool_calls is None


def test_free_text_streams_as_it_comes():
    choice = ChoiceState.of(0, None)
    assert choice.update(output("a")).text == "a" and choice.update(output("b", "length")).finish_reason == "length"
    assert choice.text == "ab"


def test_auto_decides_on_the_first_character_after_whitespace():
    spaced = ChoiceState.of(0, AUTO)
    assert not spaced.update(output(" \n"))  # whitespace alone decides nothing
    assert not spaced.update(output("[{"))  # then calls: held
    assert spaced.holds_calls
    talk = ChoiceState.of(0, AUTO)
    assert not talk.update(output("\n"))
    assert talk.update(output("Hi")).text == "\nHi"  # then text: everything held is sent
    formatted = ChoiceState.of(0, StructuredOutput("tool_calls", tools=(ToolFunction("f"),), auto=True,
                                                   json_schema={"type": "object"}))
    assert formatted.update(output('{"ok')).text == '{"ok'  # "{" opens the response_format's JSON, not a call


def test_calls_that_ran_out_are_no_text_and_carry_no_logprobs():
    choice = ChoiceState.of(0, FORCED)
    assert not choice.update(output("[", logprob="["))
    last = choice.update(output("{", "length", logprob="{"))
    assert last.text == "" and not last.logprobs and choice.logprobs == [] and choice.text == ""
    assert last.finish_reason == "length" and choice.answer_calls == []
