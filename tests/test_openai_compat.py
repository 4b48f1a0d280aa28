"""Drop-in compatibility with the official openai SDK, over real HTTP
(uvicorn) in front of the real worker loop on the tiny engine: every
documented Chat Completions field accepted, vLLM's extensions, legacy
/v1/completions, /v1/responses (whole and streamed), models.retrieve,
structured outputs (json_object, json_schema, parse) and forced tool calls,
tool use in the history, `pad` on streams, and OpenAI-shaped 404s for
unknown routes. (The same against the real model and guidellm: tests marked
integration in test_clients.py.)"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel
from server_helpers import tiny_gateway

from server.openai_models import IGNORED

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "How do I sleep better?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_gateway(tmp_path_factory.mktemp("compat")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=60)


# ---- fields ------------------------------------------------------------
def test_documented_fields_are_accepted_and_vllm_extensions_honoured(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=ASK, max_completion_tokens=4, temperature=0.7, seed=1, n=2,
        store=True, metadata={"team": "docs"}, service_tier="auto", prompt_cache_key="k", safety_identifier="s",
        verbosity="low", reasoning_effort="low", user="alice", parallel_tool_calls=False, tool_choice="none",
        tools=[WEATHER], functions=[], prediction={"type": "content", "content": "x"}, modalities=["text"],
        response_format={"type": "text"}, logit_bias={"42": -100}, stop=None,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True,
                    "stop_token_ids": [2], "prompt_cache_retention": "24h"},
    )
    assert [c.finish_reason for c in answer.choices] == ["length", "length"]
    assert answer.usage.completion_tokens == 8
    assert set(IGNORED) >= {"service_tier", "prompt_cache_key", "safety_identifier",
                            "verbosity", "stream_options.include_obfuscation"}
    assert client.chat.completions.retrieve(answer.id).metadata == {"team": "docs"}  # store: true kept it


def test_include_stop_str_in_output_and_skip_special_tokens(client):
    """vLLM's: the matched stop string stays in the answer; with special
    tokens kept, an answer that may pass end-of-sequence (ignore_eos) shows
    them, and a stop token's own text comes with include_stop_str_in_output."""
    ask = dict(model=MODEL, messages=ASK, max_tokens=30, temperature=0)
    free = client.chat.completions.create(**ask).choices[0].message.content
    stop = free[5:8]
    cut = client.chat.completions.create(**ask, stop=[stop]).choices[0]
    kept = client.chat.completions.create(**ask, stop=[stop], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.message.content == cut.message.content + stop and free.startswith(kept.message.content)
    assert cut.stop_reason == kept.stop_reason == stop  # vLLM's: which stop ended it
    streamed = [c.choices[0] for c in client.chat.completions.create(**ask, stop=[stop], stream=True) if c.choices]
    assert streamed[-1].finish_reason == "stop" and streamed[-1].stop_reason == stop
    legacy = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0)
    assert legacy.choices[0].stop_reason is None  # an answer not ended by a stop
    # a stop token that is not special: its text stays too (vLLM's), and only with the field
    token = client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0, logprobs=0,
                                      extra_body={"logit_bias": {"905": 100}}).choices[0].logprobs.tokens[0]
    ended = dict(**ask, logit_bias={"905": 100}, extra_body={"stop_token_ids": [905]})
    assert client.chat.completions.create(**ended).choices[0].message.content == ""
    assert client.chat.completions.create(**ended).choices[0].stop_reason == 905
    with_token = client.chat.completions.create(**{**ended, "extra_body": {"stop_token_ids": [905],
                                                                           "include_stop_str_in_output": True}})
    assert with_token.choices[0].message.content == token and token.strip()
    # a bias toward the special tokens: the answer is their text, or nothing
    special = {str(i): 100 for i in (0, 1, 2)}  # <|endoftext|>, <|im_start|>, <|im_end|>
    shown = client.chat.completions.create(**ask, logit_bias=special, extra_body={
        "skip_special_tokens": False, "include_stop_str_in_output": True}).choices[0]
    hidden = client.chat.completions.create(**ask, logit_bias=special).choices[0]
    assert shown.finish_reason == hidden.finish_reason == "stop"
    assert hidden.message.content == ""
    # specials before end-of-turn (<|im_end|>, the stop token), which comes last, with include_stop_str_in_output
    text = shown.message.content
    assert text.endswith("<|im_end|>") and not re.sub(r"<\|(endoftext|im_start|im_end)\|>", "", text), text


def test_unknown_and_unsupported_fields_are_refused_by_name(server):
    base = {"model": MODEL, "messages": ASK, "max_tokens": 2}
    cases = {
        "bogus": ({"bogus": 1}, "unknown_parameter"),
        "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, "unsupported_parameter"),
        "web_search_options": ({"web_search_options": {}}, "unsupported_parameter"),
        "modalities": ({"modalities": ["text", "audio"]}, "unsupported_parameter"),
        "tool_choice": ({"tools": [WEATHER], "tool_choice": {"type": "custom", "custom": {"name": "x"}}},
                        "unsupported_parameter"),
        "tools[0].type": ({"tools": [{"type": "custom", "custom": {"name": "x"}}], "tool_choice": "required"},
                          "unsupported_parameter"),
        "stream_options": ({"stream_options": {"include_usage": True}}, "invalid_value"),
    }
    for param, (extra, code) in cases.items():
        response = post(server, "/v1/chat/completions", {**base, **extra})
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param and response.json()["error"]["code"] == code, response.text
    # a type mismatch is refused too (strict request models)
    assert post(server, "/v1/chat/completions", {**base, "store": "yes"}).status_code == 400


def test_streams_carry_pad_on_the_first_chunk_and_continuous_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True, "include_obfuscation": False},
        extra_body={"preference": "short answers", "pad": {"weight": 2.0, "top_k": 10}})
    chunks = list(stream)
    pad = chunks[0].model_extra["pad"]
    assert pad == {"preferences": [{"text": "short answers", "weight": 1.0}], "source": "request",
                   "reward_model": "self", "weight": 2.0, "top_k": 10, "min_p": 0.1,  # min_p: the default
                   "base_sees_preference": False}
    assert all(c.usage is not None for c in chunks)
    assert [c.usage.completion_tokens for c in chunks] == [0, 1, 2, 3, 3]
    assert chunks[-1].choices == [] and chunks[0].usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0
    # vLLM's continuous_usage_stats counts only with include_usage: alone (or beside false) no usage at all
    for options in ({"continuous_usage_stats": True}, {"include_usage": False, "continuous_usage_stats": True}):
        quiet = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, stream=True,
                                                    stream_options=options))
        assert all(c.usage is None for c in quiet) and all(c.choices for c in quiet)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert plain.model_extra["pad"] == {"preferences": [], "source": "none", "reward_model": "self", "weight": 4.0,
                                        "top_k": 80, "min_p": 0.1, "base_sees_preference": False, "applied": False}


def test_a_streamed_answer_opens_each_choice_in_a_chunk_of_its_own(client):
    """As OpenAI and vLLM stream n choices: a role chunk per choice, each
    holding that choice alone; `pad` on the first chunk only."""
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, n=3, temperature=1,
                                                 seed=5, stream=True))
    openings = chunks[:3]
    assert [[c.index for c in chunk.choices] for chunk in openings] == [[0], [1], [2]]
    assert all(chunk.choices[0].delta.role == "assistant" for chunk in openings)
    assert "pad" in chunks[0].model_extra and not any("pad" in chunk.model_extra for chunk in chunks[1:])
    assert all(len(chunk.choices) == 1 for chunk in chunks)


def test_usage_counts_the_prompt_tokens_read_from_the_prefix_cache(client):
    long = [{"role": "user", "content": "Tell me, in detail, " + "about rivers and boats and bridges " * 8}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 64
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached % 32 == 0 and again.usage.prompt_tokens - 32 <= cached < again.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=long, max_tokens=2, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_tool_use_in_the_history_is_accepted(client):
    messages = [
        {"role": "system", "content": "You help with the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


# ---- structured outputs and tools ---------------------------------------
class Verdict(BaseModel):
    ok: bool
    color: Literal["red", "blue"]


def test_json_schema_and_parse(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    answer = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "check", "schema": schema, "strict": True}})
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content)["ok"], bool)
    parsed = client.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                           response_format=Verdict, extra_body={"preference": "short answers"})
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


def test_json_object_answers_parse(client, tokenizer):
    # The tiny random model writes endless strings; a bias on "{" and "}"
    # (chosen only where the grammar allows them) closes the object at once.
    braces = {str(tokenizer(b, add_special_tokens=False)["input_ids"][0]): 50 for b in "{}"}
    answer = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                            response_format={"type": "json_object"}, logit_bias=braces)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_a_named_tool_call_and_a_required_one(client):
    named = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                           tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    required = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                              tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    (call,) = required.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and json.loads(call.function.arguments)


def test_a_streamed_tool_call_is_announced_then_its_arguments_stream(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=60, temperature=0, stream=True, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == []  # the call's JSON is never content
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, *fragments = calls  # as OpenAI streams a call (more in test_tool_call_streaming.py)
    assert first.function.name == "get_weather" and first.id.startswith("call_") and first.function.arguments == ""
    assert len(fragments) > 1 and all(f.id is None and f.function.name is None for f in fragments)
    assert json.loads("".join(f.function.arguments for f in fragments))["city"] in ("Paris", "Rome")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    with client.chat.completions.stream(model=MODEL, messages=ASK, max_tokens=60, temperature=0, tools=[WEATHER],
                                        tool_choice="required") as stream:
        message = stream.get_final_completion().choices[0].message
    assert message.content is None and message.tool_calls[0].function.name == "get_weather"  # as when not streamed


def test_the_sdks_own_message_objects_go_back_as_history(client):
    """The SDK's documented loops append `completion.choices[0].message` (or
    its model_dump()) to the history; what the SDK and LiteLLM add there
    (parsed, parsed_arguments, a streamed call's index, annotations,
    reasoning_content...) is accepted and ignored, not a 400."""
    import pydantic

    class GetWeather(pydantic.BaseModel):
        city: Literal["Paris", "Rome"]

    tools = [openai.pydantic_function_tool(GetWeather)]
    named = {"type": "function", "function": {"name": "GetWeather"}}
    parsed = client.chat.completions.parse(model=MODEL, messages=ASK, tools=tools, tool_choice=named, max_tokens=40,
                                           temperature=0).choices[0].message
    assert parsed.tool_calls[0].function.parsed_arguments.city in ("Paris", "Rome")
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=tools, tool_choice=named, max_tokens=40,
                                        temperature=0) as stream:
        streamed = stream.get_final_completion().choices[0].message
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3).choices[0].message
    litellm_like = {**plain.model_dump(), "reasoning_content": None, "thinking_blocks": None,
                    "provider_specific_fields": None, "annotations": []}
    for message in (parsed, streamed, parsed.model_dump(), streamed.model_dump()):
        history = [*ASK, message, {"role": "tool", "tool_call_id": message_call_id(message), "content": "sunny"}]
        assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=2).choices
    for message in (plain, plain.model_dump(), litellm_like):
        assert client.chat.completions.create(model=MODEL, messages=[*ASK, message, *ASK], max_tokens=2).choices


def message_call_id(message) -> str:
    calls = message["tool_calls"] if isinstance(message, dict) else message.tool_calls
    first = calls[0]
    return first["id"] if isinstance(first, dict) else first.id


def test_a_tool_call_that_runs_out_of_tokens_is_never_its_json_as_text(client):
    """Cut before a call is named: an empty answer; cut inside one: the call
    begun, its arguments so far (as OpenAI returns one), as a stream gives it."""
    ask = dict(model=MODEL, messages=ASK, temperature=0, tools=[WEATHER], tool_choice="required")
    choice = client.chat.completions.create(**ask, max_tokens=3).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content is None
    (complete,) = client.chat.completions.create(**ask, max_tokens=60).choices[0].message.tool_calls
    cut = client.chat.completions.create(**ask, max_tokens=15).choices[0]
    (begun,) = cut.message.tool_calls
    assert cut.finish_reason == "length" and cut.message.content is None and begun.function.name == "get_weather"
    assert complete.function.arguments.startswith(begun.function.arguments) and begun.id.startswith("call_")
    responses = client.responses.create(model=MODEL, input="Weather in Paris?", max_output_tokens=15, temperature=0,
                                        tools=[{"type": "function", **WEATHER["function"]}], tool_choice="required")
    assert responses.status == "incomplete" and [item.type for item in responses.output] == ["function_call"]
    assert responses.output[0].status == "incomplete" and responses.output_text == ""


def token(tokenizer, text: str) -> str:
    (token_id,) = tokenizer(text, add_special_tokens=False)["input_ids"]
    return str(token_id)


def test_auto_tool_choice_answers_calls_or_streams_text(client, tokenizer):
    """tools without tool_choice (or "auto"): the model's first token
    chooses. The tiny model is steered with logit_bias: toward "[" it calls,
    toward "Hello" it talks, and the text streams as it comes."""
    calls = {token(tokenizer, "["): 50, token(tokenizer, "]"): 20, token(tokenizer, "}]"): 20}  # and close the list
    for extra in ({}, {"tool_choice": "auto"}, {"extra_body": {"preference": "short answers"}}):
        answer = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                                tools=[WEATHER, TIME], logit_bias=calls, **extra)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert {c.function.name for c in choice.message.tool_calls} <= {"get_weather", "get_time"}
        assert all(isinstance(json.loads(c.function.arguments), dict) for c in choice.message.tool_calls)
    talk = {token(tokenizer, "Hello"): 50}
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, stream=True,
                                                 tools=[WEATHER], logit_bias=talk))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) >= 5 and contents[0].startswith("Hello")  # token by token, not one delta at the end
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    # The SDK's stream helper refuses an answer cut by max_tokens: this one ends after "Hello" (end-of-sequence
    # is what the model wants most, but an empty answer is neither text nor calls).
    hello_then_end = {**talk, token(tokenizer, "<|im_end|>"): 60}
    with client.chat.completions.stream(model=MODEL, messages=ASK, max_tokens=6, temperature=0, tools=[WEATHER],
                                        logit_bias=hello_then_end) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.message.content == "Hello" and not final.message.tool_calls and final.finish_reason == "stop"
    with client.chat.completions.stream(model=MODEL, messages=ASK, max_tokens=60, temperature=0, tools=[WEATHER],
                                        logit_bias=calls) as stream:
        message = stream.get_final_completion().choices[0].message
    assert message.tool_calls[0].function.name == "get_weather"
    # with a response_format too, the answer that is not calls is the format's JSON (a bias toward "Hello"
    # cannot make it text)
    verdict = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
        **Verdict.model_json_schema(), "additionalProperties": False}}}
    formatted = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                               tools=[WEATHER], response_format=verdict,
                                               logit_bias={**talk, token(tokenizer, '{"'): 20})
    message = formatted.choices[0].message
    assert not message.tool_calls and Verdict.model_validate_json(message.content)
    legacy = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                            functions=[WEATHER["function"]], logit_bias=calls)
    assert legacy.choices[0].finish_reason == "function_call"
    assert legacy.choices[0].message.function_call.name == "get_weather"
    # The Responses API has no logit_bias: the tiny model's own first token chooses.
    tool = {"type": "function", **WEATHER["function"]}
    for prompt in ("Weather?", "How do I sleep better?", "Hi"):
        answer = client.responses.create(model=MODEL, input=prompt, max_output_tokens=60, temperature=0, tools=[tool])
        events = list(client.responses.create(model=MODEL, input=prompt, max_output_tokens=60, temperature=0,
                                              tools=[tool], stream=True))
        streamed = events[-1].response
        assert answer.tool_choice == "auto" and streamed.output_text == answer.output_text
        assert [(o.type, getattr(o, "arguments", None)) for o in streamed.output] == \
            [(o.type, getattr(o, "arguments", None)) for o in answer.output]
        kinds = {o.type for o in answer.output}
        print(prompt, kinds, answer.output_text[:40])
        assert kinds in ({"function_call"}, {"message"}), answer.output
        if kinds == {"message"}:
            assert not answer.output_text.startswith("[")
            assert "response.output_text.delta" in [e.type for e in events]
        else:
            assert all(o.name == "get_weather" and "city" in json.loads(o.arguments) for o in answer.output)


def test_bad_constraints_are_400s_naming_the_field(server):
    base = {"model": MODEL, "messages": ASK, "max_tokens": 2}
    bad_name = {**base, "tools": [{"type": "function", "function": {"name": "no spaces"}}], "tool_choice": "required"}
    assert post(server, "/v1/chat/completions", bad_name).json()["error"]["param"] == "tools[0].function.name"
    unknown = {**base, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}
    assert post(server, "/v1/chat/completions", unknown).json()["error"]["param"] == "tool_choice"
    schema = {**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                                 "schema": {"type": "nonsense"}}}}
    response = post(server, "/v1/chat/completions", schema)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


# vLLM's structured outputs, as its clients send them (extra_body)
VLLM_CONSTRAINTS = [
    ({"structured_outputs": {"choice": ["positive", "negative"]}}, lambda t: t in ("positive", "negative")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}}, lambda t: len(t) == 8 and t[3] == "-"),
    ({"guided_regex": r"(red|blue)!"}, lambda t: t in ("red!", "blue!")),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b" "c"'}}, lambda t: t in ("a", "bc")),
    ({"guided_grammar": 'start: "x" "y"?'}, lambda t: t in ("x", "xy")),
    # outlines' Lark (a "?start:" rule), and guidance's both fields at once, the same grammar
    ({"structured_outputs": {"grammar": '?start: expr\n?expr: "ab" | "cd"'}}, lambda t: t in ("ab", "cd")),
    ({"guided_grammar": 'start: "p" | "q"', "structured_outputs": {"grammar": 'start: "p" | "q"'},
      "guided_decoding_backend": "guidance"}, lambda t: t in ("p", "q")),
    ({"guided_json": {"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"]},
      "guided_whitespace_pattern": "[ ]?"}, lambda t: json.loads(t)["k"] in (1, 2)),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                      "required": ["ok"]}}}, lambda t: isinstance(json.loads(t)["ok"], bool)),
    ({"guided_json": json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9,
                                                                        "minimum": 0}}, "required": ["n"]}),
      "guided_decoding_backend": "xgrammar"}, lambda t: json.loads(t)["n"] in range(10)),
]


@pytest.mark.parametrize("extra, matches", VLLM_CONSTRAINTS)
def test_vllm_structured_outputs_on_chat_and_completions(client, extra, matches):
    chat = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0, n=2,
                                          extra_body={**extra, "preference": "short answers"})
    for choice in chat.choices:
        assert choice.finish_reason == "stop" and matches(choice.message.content), choice.message.content
    text = client.completions.create(model=MODEL, prompt="Q: How do I sleep better?\nA:", max_tokens=40,
                                     temperature=1.0, seed=3, extra_body=extra)
    assert text.choices[0].finish_reason == "stop" and matches(text.choices[0].text), text.choices[0].text


def test_response_format_on_completions(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    text = client.completions.create(model=MODEL, prompt="Is the sky blue? JSON:", max_tokens=40, temperature=0,
                                     extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                         "name": "x", "schema": schema}}})
    assert isinstance(json.loads(text.choices[0].text)["ok"], bool)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"grammar": 'root ::= "open'}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": "[" * 50000 + "]" * 50000}}, "structured_outputs.json"),  # too deep
        ({"guided_json": "[" * 50000 + "]" * 50000, "structured_outputs": {"json": {}}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
        ({"structured_outputs": {"json": {}, "whitespace_pattern": "(("}}, "structured_outputs.json"),
        ({"guided_choice": ["a"], "structured_outputs": {"choice": ["b"]}}, "structured_outputs"),  # not the same
        ({"structured_outputs": {"regex": "a", "bogus": 1}}, "structured_outputs.bogus"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
        ({"guided_choice": ["a"], "tools": [WEATHER]}, "guided_choice"),
        ({"guided_choice": "a"}, "guided_choice"),
        ({"guided_whitespace_pattern": " ", "guided_regex": "a"}, "guided_whitespace_pattern"),
        ({"guided_whitespace_pattern": " ", "structured_outputs": {"json": {}, "whitespace_pattern": "\n"}},
         "guided_whitespace_pattern"),
    ],
)
def test_bad_vllm_constraints_are_400s_naming_the_field(server, extra, param):
    for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "Hi"})):
        if "tools" in extra and path == "/v1/completions":
            continue
        response = post(server, path, {"model": MODEL, "max_tokens": 4, **body, **extra})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (path, error)


def test_priority_needs_the_priority_policy(server):
    """vLLM's: a priority other than 0 is a 400 on a first-come server (the
    engine test covers the priority policy itself)."""
    for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "Hi"})):
        refused = post(server, path, {"model": MODEL, "max_tokens": 2, "priority": 3, **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority", refused.text
        assert post(server, path, {"model": MODEL, "max_tokens": 2, "priority": 0, **body}).status_code == 200


def test_tool_choice_none_leaves_the_tools_out_of_a_vllm_constraint(client):
    answer = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0,
                                            tools=[WEATHER], tool_choice="none",
                                            extra_body={"guided_choice": ["yes", "no"]})
    assert answer.choices[0].message.content in ("yes", "no")


def test_legacy_functions(client):
    answer = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0,
                                            functions=[WEATHER["function"]], function_call={"name": "get_weather"})
    choice = answer.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments)["city"] in ("Paris", "Rome")


# ---- models, completions, responses, unknown routes ---------------------
def test_models_retrieve(client, server):
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"


def test_completions(client):
    one = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0,
                                    extra_body={"preference": "short answers"})
    assert one.object == "text_completion" and one.choices[0].finish_reason == "length"
    assert one.usage.completion_tokens == 3 and one.model_extra["pad"]["source"] == "request"
    default = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens
    many = client.completions.create(model=MODEL, prompt=["Once upon a time", "The sea"], n=2, max_tokens=2,
                                     logprobs=2, seed=5)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.completion_tokens == 8 and len(many.choices[0].logprobs.tokens) == 2
    first = many.choices[0].logprobs
    # the 2 most likely, and the chosen token always (OpenAI's "up to logprobs + 1")
    assert 2 <= len(first.top_logprobs[0]) <= 3 and first.top_logprobs[0][first.tokens[0]] == first.token_logprobs[0]
    ids = client.completions.create(model=MODEL, prompt=[[9038, 2402, 253, 655], [504, 3181]], max_tokens=2)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 6
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=2, temperature=0, echo=True)
    text = echoed.choices[0].text
    assert text.startswith("Once upon a time") and default.choices[0].text.startswith(text[len("Once upon a time"):])
    streamed = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0,
                                              stream=True, extra_body={"preference": "short answers"}))
    assert "".join(c.choices[0].text for c in streamed) == one.choices[0].text
    assert streamed[0].model_extra["pad"]["preferences"] == [{"text": "short answers", "weight": 1.0}]


def test_completions_echo_with_logprobs_scores_the_prompt(client, server):
    """lm-evaluation-harness's loglikelihood request (token-id prompts,
    echo, logprobs 1, max_tokens 1; or 0: score only): the prompt's tokens
    come first in the logprobs, the first with null, each the plain
    model's logprob of that token after the ones before it."""
    ids = [[9038, 2402, 253, 655], [504, 3181]]
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                       seed=1234)
    for choice, prompt in zip(scored.choices, ids, strict=True):
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(prompt) + 1 and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and all(v <= 0 for v in logprobs.token_logprobs[1:])
        for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:],
                                     strict=True):  # the most likely token, and the prompt's own
            assert 1 <= len(top) <= 2 and top[token] == value and max(top.values()) >= value
        assert choice.text == "".join(logprobs.tokens) and logprobs.text_offset[0] == 0
    only = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, logprobs=1, echo=True)
    assert only.usage.completion_tokens == 0 and [c.finish_reason for c in only.choices] == ["length", "length"]
    for choice, full in zip(only.choices, scored.choices, strict=True):  # the same numbers, without the answer
        assert choice.logprobs.token_logprobs == full.logprobs.token_logprobs[:-1]
        assert choice.text == "".join(full.logprobs.tokens[:-1])
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=2, temperature=0, logprobs=0,
                                     echo=True)
    assert text.choices[0].text.startswith("Once upon a time") and len(text.choices[0].logprobs.tokens) == 4 + 2
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=2, temperature=0,
                                            logprobs=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text.choices[0].text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        text.choices[0].logprobs.token_logprobs
    emoji = client.completions.create(model=MODEL, prompt="Party 🎉 time", max_tokens=2, temperature=0, logprobs=0,
                                      echo=True).choices[0]
    offsets = emoji.logprobs.text_offset
    assert offsets[-2] == len("Party 🎉 time")  # the answer starts where the echo ends, whatever the pieces
    pieces = [(token, offset) for token, offset in zip(emoji.logprobs.tokens, offsets, strict=True) if "\ufffd" in token]
    # the emoji's byte pieces (the first with the space before it) start at the space or the emoji
    assert pieces and {offset for _, offset in pieces} <= {len("Party"), len("Party ")}
    for token, offset in zip(emoji.logprobs.tokens, offsets, strict=True):  # every whole token at its own text
        assert "\ufffd" in token or emoji.text[offset:].startswith(token), (token, offset)
    refused = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_responses(client):
    response = client.responses.create(model=MODEL, input="How do I sleep better?", instructions="Be brief.",
                                       max_output_tokens=4, store=True, metadata={"team": "docs"},
                                       extra_body={"preference": "short answers"})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 4 and response.output_text
    assert response.model_extra["pad"]["preferences"][0]["text"] == "short answers"
    # greedy: a sampled token may be half of a multi-byte character, which streams no delta of its own
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Hi"}], stream=True,
                                          max_output_tokens=3, temperature=0))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds.count("response.output_text.delta") == 3 and kinds[-1] == "response.incomplete"
    assert events[-1].response.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.model_extra["pad"]["source"] == "none"
    # the SDK's stream helper, on an answer that completes (a grammar ends it)
    with client.responses.stream(model=MODEL, input="Is it ok?", max_output_tokens=40, temperature=0,
                                 text_format=Verdict) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and isinstance(final.output_parsed, Verdict)
    assert final.completed_at >= final.created_at and response.completed_at is None  # OpenAI's: once completed
    assert final.tool_choice == response.tool_choice == "auto"  # OpenAI's default, with tools or without
    # logprobs only when `include` asks for them, as OpenAI and vLLM (top_logprobs alone gives none)
    ask = dict(model=MODEL, input="Hi", max_output_tokens=3, temperature=0, top_logprobs=2)
    assert client.responses.create(**ask).output[0].content[0].logprobs == []
    [part] = client.responses.create(**ask, include=["message.output_text.logprobs"]).output[0].content
    assert len(part.logprobs) == 3 and all(len(entry.top_logprobs) == 2 for entry in part.logprobs)


def test_responses_structured_and_function_calls(client):
    answer = client.responses.create(model=MODEL, input="Is it ok?", max_output_tokens=40, temperature=0,
                                     text={"format": {"type": "json_schema", "name": "v", "strict": True,
                                                      "schema": Verdict.model_json_schema() | {"additionalProperties": False}}})
    assert answer.status == "completed" and Verdict.model_validate_json(answer.output_text)
    parsed = client.responses.parse(model=MODEL, input="Is it ok?", max_output_tokens=40, temperature=0,
                                    text_format=Verdict)
    assert isinstance(parsed.output_parsed, Verdict) and parsed.output_parsed == Verdict.model_validate_json(
        answer.output_text)
    tool = {"type": "function", **WEATHER["function"]}
    called = client.responses.create(model=MODEL, input="Weather?", max_output_tokens=60, temperature=0, tools=[tool],
                                     tool_choice={"type": "function", "name": "get_weather"})
    (item,) = called.output
    assert item.type == "function_call" and item.call_id.startswith("call_")
    history = [{"role": "user", "content": "Weather?"}, item.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}]
    follow_up = client.responses.create(model=MODEL, input=history, max_output_tokens=2)
    assert follow_up.output[0].type == "message"


def test_responses_background_needs_store_and_an_unknown_conversation_is_a_404(server):
    base = {"model": MODEL, "input": "Hi", "max_output_tokens": 2}
    response = post(server, "/v1/responses", {**base, "background": True, "store": False})  # tests/test_background_responses.py
    assert response.status_code == 400 and response.json()["error"]["param"] == "background"
    unknown = post(server, "/v1/responses", {**base, "conversation": "conv_1"})  # tests/test_conversations.py
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "conversation"


def test_unknown_routes_are_openai_shaped_404s(server):
    for method, path in (("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/embeddings"), ("POST", "/v1/audio/speech")):
        response = httpx.request(method, f"{server}{path}", json={})
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "unknown_url" and path in error["message"]
        assert "POST /v1/chat/completions" in error["message"] and "POST /v1/responses" in error["message"]


def test_nullable_openai_fields_mean_their_default(server):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, "n": None, "stream": None, "logprobs": None,
            "temperature": None, "stop": None, "presence_penalty": None, "seed": None, "top_logprobs": None}
    answer = post(server, "/v1/chat/completions", body)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 1 and answer.json()["choices"][0]["logprobs"] is None
    completion = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "echo": None,
                                                  "n": None, "stream": None, "logprobs": None})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"]


def sse_data(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def test_every_shape_validates_against_the_sdk_types(server):
    """The SDK builds its objects without validation, so a missing field
    only fails a client that reads it: every answer, chunk and event is
    validated here against the SDK's own (pydantic) types."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    event = TypeAdapter(ResponseStreamEvent)
    chats = [{"max_tokens": 3, "n": 2, "logprobs": True, "top_logprobs": 2, "preference": "short answers"},
             {"max_tokens": 60, "temperature": 0, "tools": [WEATHER, TIME], "tool_choice": "required"},
             {"max_tokens": 60, "temperature": 0, "response_format": {"type": "json_object"}}]
    for extra in chats:
        body = {"model": MODEL, "messages": ASK, **extra}
        ChatCompletion.model_validate(post(server, "/v1/chat/completions", body).json())
        for chunk in sse_data(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}):
            ChatCompletionChunk.model_validate(chunk)
    tool = {"type": "function", **WEATHER["function"]}
    for extra in ({"max_output_tokens": 3, "top_logprobs": 2, "instructions": "Be brief."},
                  {"max_output_tokens": 60, "temperature": 0, "tools": [tool], "tool_choice": "required"}):
        body = {"model": MODEL, "input": "Weather?", **extra}
        answer = Response.model_validate(post(server, "/v1/responses", body).json())
        assert answer.usage.input_tokens_details.cache_write_tokens == 0
        for data in sse_data(server, "/v1/responses", body):
            event.validate_python(data)


def test_a_request_may_leave_the_model_out_as_in_vllm(tmp_path):
    """vLLM serves a request without `model` with its served model (chat,
    completions, Responses); a wrong name is still a 404."""
    with tiny_gateway(tmp_path) as url:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/completions", {"prompt": "Hi"}), ("/v1/responses", {"input": "Hi"})):
            answer = httpx.post(f"{url}{path}", json={**body, "max_tokens" if path != "/v1/responses"
                                                      else "max_output_tokens": 3}, timeout=60)
            assert answer.status_code == 200 and answer.json()["model"] == "smollm2-135m-instruct", path
            wrong = httpx.post(f"{url}{path}", json={**body, "model": "gpt-4o"}, timeout=60)
            assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found", path
