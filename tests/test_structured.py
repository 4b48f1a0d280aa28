"""Structured outputs (pad_core/structured.py): the token mask as pure
functions, then the engine on the tiny random model, where only the grammar
can make the output parse."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pad_core.decoding import StepInputs, TokenMask, apply_token_mask, next_tokens
from pad_core.detokenize import IncrementalDetokenizer
from pad_core.engine import BASE_RUNNER, default_max_tokens
from pad_core.errors import InvalidRequestError
from pad_core.guidance import prescreen
from pad_core.ipc import pack, unpack
from pad_core.structured import (
    CallListScanner,
    GrammarMatcher,
    check_spec,
    tightened,
    parse_tool_calls,
    relocated,
    tool_call_schema,
    unpack_bitmask,
)
from pad_core.testing import biased
from pad_core.types import (
    ChatRequest,
    GuidanceParams,
    Preference,
    SamplingParams,
    StepOutput,
    StructuredOutput,
    TextRequest,
    ToolCall,
    ToolFunction,
)

NEG = float("-inf")
PREF = Preference("I like short answers with a bit of humour")
# Every value bounded: on random weights the answer must still complete.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "word": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "color", "word"],
    "additionalProperties": False,
}
WEATHER = ToolFunction(
    "get_weather",
    "Current weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
TIME = ToolFunction("get_time", None, {"type": "object", "properties": {}, "additionalProperties": False})


def chat(rid, structured=None, preferences=(), temperature=0.0, seed=None, max_tokens=48, content="Answer in JSON.",
         **guidance) -> ChatRequest:
    return ChatRequest(
        rid,
        [{"role": "user", "content": content}],
        list(preferences),
        SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens),
        GuidanceParams(**guidance),
        structured,
    )


def run(engine, *requests) -> dict[str, list[StepOutput]]:
    outputs: dict[str, list[StepOutput]] = {}
    for output in engine.generate(requests):
        outputs.setdefault(output.request_id, []).append(output)
    return outputs


def text_of(outputs: list[StepOutput]) -> str:
    return "".join(o.text for o in outputs)


def matches_schema(value) -> bool:
    return (
        set(value) == {"ok", "color", "word"}
        and isinstance(value["ok"], bool)
        and value["color"] in ("red", "green", "blue")
        and isinstance(value["word"], str)
        and len(value["word"]) <= 6
    )


# ---- pure functions ----------------------------------------------------------------


def test_apply_token_mask_only_touches_constrained_rows():
    logits = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    mask = TokenMask(torch.tensor([1]), torch.tensor([[True, False, True, False]]))
    masked = apply_token_mask(logits, mask)
    assert masked[0].tolist() == logits[0].tolist() and masked[2].tolist() == logits[2].tolist()
    assert masked[1].tolist() == [4.0, NEG, 6.0, NEG]
    assert logits[1, 1] == 5.0  # the input is left alone (logprobs read it)
    assert apply_token_mask(logits, None) is logits
    every = apply_token_mask(logits, TokenMask(torch.tensor([0, 1, 2]), torch.tensor([[True, False, False, True]] * 3)))
    assert every[2].tolist() == [8.0, NEG, NEG, 11.0] and logits[2, 1] == 9.0
    swapped = apply_token_mask(logits[:2], TokenMask(torch.tensor([1, 0]), torch.tensor([[True] * 4, [False] * 3 + [True]])))
    assert swapped[0].tolist() == [NEG, NEG, NEG, 3.0] and swapped[1].tolist() == [4.0, 5.0, 6.0, 7.0]


def make_inputs(base, mask, temperature=None, top_k=None, rewards=None, owner=(), weight=None, min_p=None):
    base = torch.as_tensor(base, dtype=torch.float32)
    n = base.shape[0]
    table = torch.as_tensor(rewards if rewards is not None else [[0.0] * base.shape[1]], dtype=torch.float32)
    return StepInputs(
        base_logits=base,
        reward_logits_at=lambda candidates: table[: candidates.shape[0]].gather(1, candidates),
        reward_owner=torch.tensor(list(owner), dtype=torch.long),
        preference_weight=torch.ones(len(owner)),
        guidance_weight=torch.tensor(weight if weight is not None else [1.0] * n),
        top_k=torch.tensor(top_k if top_k is not None else [3] * n),
        temperature=temperature if temperature is not None else [0.0] * n,
        top_p=[1.0] * n,
        generators=[torch.Generator().manual_seed(i) for i in range(n)],
        min_p=None if min_p is None else torch.tensor(min_p),
        token_mask=mask,
    )


def test_plain_rows_greedy_and_sampled_only_pick_legal_tokens():
    base = [[9.0, 8.0, 1.0, 0.0, -1.0]] * 3
    allowed = torch.tensor([[False, False, True, False, True], [False, True, False, False, False]])
    mask = TokenMask(torch.tensor([0, 2]), allowed)
    assert next_tokens(make_inputs(base, mask)).tolist() == [2, 0, 1]  # row 1 has no grammar
    for _ in range(20):
        sampled = next_tokens(make_inputs(base, mask, temperature=[5.0, 5.0, 5.0])).tolist()
        assert sampled[0] in (2, 4) and sampled[2] == 1


def test_guided_row_reward_chooses_only_among_legal_candidates():
    # The reward loves token 0, the base's best; the grammar forbids it. Only
    # two tokens are legal although top_k is 3: the third candidate (-inf) is
    # dropped by the prescreen rather than scored (no nan).
    base = [[9.0, 8.0, 7.0, 1.0, 0.0]]
    rewards = [[50.0, 0.0, 0.0, 0.0, 3.0]]
    allowed = torch.tensor([[False, True, False, False, True]])
    mask = TokenMask(torch.tensor([0]), allowed)
    inputs = make_inputs(base, mask, rewards=rewards, owner=[0], weight=[10.0], top_k=[3])
    assert next_tokens(inputs).tolist() == [4]  # the reward picks the legal token it prefers
    inputs = make_inputs(base, mask, rewards=rewards, owner=[0], weight=[0.0], top_k=[3])
    assert next_tokens(inputs).tolist() == [1]  # w = 0: the base's best legal token
    for _ in range(20):
        sampled = make_inputs(base, mask, temperature=[3.0], rewards=rewards, owner=[0], weight=[1.0], top_k=[3])
        assert next_tokens(sampled).item() in (1, 4)


def test_prescreen_never_keeps_a_forbidden_candidate():
    logits = torch.tensor([[NEG, 2.0, NEG, 1.0, NEG], [3.0, 2.0, 1.0, 0.0, -1.0]])
    for min_p in (None, torch.tensor([0.0, 0.0]), torch.tensor([0.1, 0.1])):
        candidates, valid = prescreen(logits, torch.tensor([4, 4]), min_p)
        kept = candidates[0][valid[0]].tolist()
        assert kept == [1, 3]
        assert valid[1, :2].all()


def test_unpack_bitmask_reads_llguidance_bit_order():
    words = torch.zeros((2, 2), dtype=torch.int32)
    words[0, 0] = 1 | (1 << 5)  # tokens 0 and 5
    words[0, 1] = -(2**31)  # bit 31 of word 1: token 63
    words[1, 1] = 1  # token 32
    allowed = unpack_bitmask(words, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 5, 63]
    assert allowed[1].nonzero().flatten().tolist() == [32]
    assert unpack_bitmask(words, 40).shape == (2, 40)
    wider = unpack_bitmask(words, 70)  # a model vocabulary past the tokenizer's: never allowed
    assert wider.shape == (2, 70) and not wider[:, 64:].any()


def test_tool_call_schema_and_parse():
    schema = tool_call_schema([WEATHER, TIME], None, parallel=True)
    assert schema["minItems"] == 1 and "maxItems" not in schema and len(schema["items"]["anyOf"]) == 2
    named = tool_call_schema([WEATHER, TIME], "get_time", parallel=True)
    assert named["maxItems"] == 1 and named["items"]["properties"]["name"] == {"const": "get_time"}
    assert tool_call_schema([WEATHER, TIME], None, parallel=False)["maxItems"] == 1
    calls = parse_tool_calls('[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                             '{"name": "get_time", "arguments": {}}]')
    assert calls == [ToolCall("get_weather", '{"city": "Paris", "unit": "c"}'), ToolCall("get_time", "{}")]
    assert parse_tool_calls('[{"name": "get_weather", "argu') is None
    assert parse_tool_calls("[]") is None
    for given in (None, {}):  # no parameters: no arguments (OpenAI), not any object the model makes up
        arguments = tool_call_schema([ToolFunction("now", None, given)], None, parallel=True)["items"]["properties"]
        assert arguments["arguments"] == {"type": "object", "properties": {}, "additionalProperties": False}


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (StructuredOutput("json_schema"), "response_format"),
        (StructuredOutput("json_schema", json_schema=["not", "a", "schema"]), "response_format"),
        (StructuredOutput("xml"), "response_format"),
        (StructuredOutput("tool_calls"), "tools"),
        (StructuredOutput("tool_calls", tools=(WEATHER, WEATHER)), "tools"),
        (StructuredOutput("tool_calls", tools=(ToolFunction("bad name!"),)), "tools[0].function.name"),
        (StructuredOutput("tool_calls", tools=(ToolFunction("f", parameters="x"),)), "tools[0].function.parameters"),
        (StructuredOutput("tool_calls", tools=(WEATHER,), tool_choice="nope"), "tool_choice"),
    ],
)
def test_check_spec_names_the_param(spec, param):
    with pytest.raises(InvalidRequestError) as error:
        check_spec(spec)
    assert error.value.param == param


def test_types_round_trip_through_ipc():
    spec = StructuredOutput("tool_calls", tools=(WEATHER, TIME), tool_choice="get_time", parallel_tool_calls=False)
    request = chat("r", spec)
    assert ChatRequest.from_dict(unpack(pack({"type": "add", "request": request.to_dict()}))["request"]) == request
    schema_request = chat("s", StructuredOutput("json_schema", json_schema=SCHEMA, schema_name="x", strict=True))
    assert ChatRequest.from_dict(schema_request.to_dict()) == schema_request
    assert ChatRequest.from_dict(chat("p").to_dict()).structured is None
    output = StepOutput("r", [1], "x", "stop", 3, 1, tool_calls=[ToolCall("f", "{}")])
    assert StepOutput.from_dict(unpack(pack({"type": "outputs", "outputs": [output.to_dict()]}))["outputs"][0]) == output


def test_default_max_tokens_is_capped_by_the_room_left():
    assert default_max_tokens(1024, 5000) == 1024
    assert default_max_tokens(1024, 100) == 100
    assert default_max_tokens(0, 100) == 100


# ---- the engine on the tiny random model ---------------------------------------------


@pytest.fixture(scope="module")
def shared_engine(make_engine):
    """One engine for the module: its llguidance tokenizer is built once
    (~0.5 s). Every test runs its requests to the end, so it starts empty."""
    return make_engine()


@pytest.fixture
def engine(shared_engine):
    assert not shared_engine.has_unfinished()
    return shared_engine


def test_json_schema_batched_beside_plain_and_guided_requests(engine, make_engine):
    plain = chat("plain", content="How do I sleep better at night?", max_tokens=16)
    alone = text_of(run(make_engine(), plain)["plain"])
    spec = StructuredOutput("json_schema", json_schema=SCHEMA, strict=True)
    outputs = run(
        engine,
        chat("schema-greedy", spec),
        chat("schema-sampled-1", spec, temperature=1.0, seed=1),  # n > 1: one engine request per choice
        chat("schema-sampled-2", spec, temperature=1.0, seed=2),
        chat("schema-pad", spec, preferences=[PREF], weight=4.0, top_k=20),
        chat("schema-pad-sampled", spec, preferences=[PREF], weight=8.0, temperature=1.0, seed=3),
        plain,
        chat("guided-free", preferences=[PREF], weight=4.0, max_tokens=16),
    )
    for rid, outs in outputs.items():
        if rid.startswith("schema"):
            assert outs[-1].finish_reason == "stop", rid
            assert matches_schema(json.loads(text_of(outs))), rid
            assert outs[-1].token_ids[-1] not in engine.stop_token_ids  # stopped by the grammar, not EOS
    assert text_of(outputs["plain"]) == alone  # rows without a constraint are untouched
    assert outputs["plain"][-1].finish_reason == outputs["guided-free"][-1].finish_reason == "length"


def test_json_object_is_valid_json_so_far_and_completes(engine):
    spec = StructuredOutput("json_object")
    outs = run(engine, chat("obj", spec, max_tokens=24))["obj"]
    # Random weights write one endless key; every token was still legal JSON.
    tokens = [t for o in outs for t in o.token_ids]
    checker = engine.structured.start(spec)
    for token in tokens:
        checker.consume(token)
    assert checker.error is None and text_of(outs).startswith("{")
    # A model that likes closing tokens (and end-of-sequence) finishes the object.
    bias = torch.zeros(engine.runners[BASE_RUNNER].head.vocab_size)
    vocab = engine.tokenizer.get_vocab()
    bias[[vocab['"'], vocab["}"], vocab['"}'], *engine.stop_token_ids]] = 30.0
    with biased(engine, bias):
        outputs = run(engine, chat("g", spec), chat("s", spec, temperature=1.0, seed=0),
                      chat("p", spec, preferences=[PREF], weight=4.0))
    for outs in outputs.values():
        assert outs[-1].finish_reason == "stop"
        assert isinstance(json.loads(text_of(outs)), dict)


def test_end_of_sequence_only_where_the_grammar_accepts(engine):
    bias = torch.zeros(engine.runners[BASE_RUNNER].head.vocab_size)
    bias[list(engine.stop_token_ids)] = 100.0  # the model wants to stop at once
    with biased(engine, bias):
        outputs = run(
            engine,
            chat("obj", StructuredOutput("json_schema", json_schema=SCHEMA)),
            chat("int", StructuredOutput("json_schema", json_schema={"type": "integer"})),
            chat("free", max_tokens=8),
        )
    assert matches_schema(json.loads(text_of(outputs["obj"])))
    number = outputs["int"]
    assert number[-1].finish_reason == "stop" and number[-1].token_ids[-1] in engine.stop_token_ids
    assert isinstance(json.loads(text_of(number)), int)  # one digit, then the end it wanted
    assert outputs["free"][0].finish_reason == "stop"  # unconstrained: stops at once


def test_named_tool_call_arguments_parse(engine):
    spec = StructuredOutput("tool_calls", tools=(WEATHER, TIME), tool_choice="get_weather")
    outputs = run(
        engine,
        chat("named", spec, content="What is the weather in Paris?", max_tokens=64),
        chat("named-pad", spec, preferences=[PREF], weight=4.0, temperature=1.0, seed=5, max_tokens=64),
    )
    for outs in outputs.values():
        last = outs[-1]
        assert last.finish_reason == "stop"
        assert [call.name for call in last.tool_calls] == ["get_weather"]
        arguments = json.loads(last.tool_calls[0].arguments)
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
        assert json.loads(text_of(outs))[0]["arguments"] == arguments  # the text deltas are the raw calls
        assert all(o.tool_calls is None for o in outs[:-1])


def test_required_tool_call_picks_one_of_the_tools_and_the_prompt_lists_them(engine):
    spec = StructuredOutput("tool_calls", tools=(WEATHER, TIME), parallel_tool_calls=False)
    last = run(engine, chat("req", spec, temperature=1.0, seed=0, max_tokens=64))["req"][-1]
    assert last.finish_reason == "stop" and len(last.tool_calls) == 1
    assert last.tool_calls[0].name in ("get_weather", "get_time")
    json.loads(last.tool_calls[0].arguments)
    # SmolLM2's template knows no tools: they are described in the system message.
    prompt, _ = engine.prompts.encode_request([{"role": "user", "content": "hi"}], [], False, tools=spec.tools)
    assert "get_weather" in engine.tokenizer.decode(prompt)
    info = engine.model_info()
    assert info["chat_template_tools"] is False and "tool_calls" in info["structured_outputs"]


def test_auto_tool_choice_opens_calls_with_a_bracket_or_answers_text(engine):
    spec = StructuredOutput("tool_calls", tools=(WEATHER, TIME), auto=True)
    vocab = engine.tokenizer.get_vocab()
    # At the first token "[" and "{" open calls, and nothing else may open with them: "[[", "['" or "{'"
    # could open neither the calls' JSON nor a text answer.
    first = engine.structured.start(spec).allowed(engine.runners[BASE_RUNNER].head.vocab_size)
    openers = {token: bool(first[i]) for token, i in vocab.items() if token.startswith(("[", "{"))}
    assert openers.pop("[") and openers.pop("{") and openers.pop('{"')
    assert not any(openers.values()), {token for token, allowed in openers.items() if allowed}
    assert first[vocab["Hello"]] and first[vocab["The"]]  # text opens with anything else
    assert not first[list(engine.stop_token_ids)].any()  # an empty answer is neither
    bias = torch.zeros(engine.runners[BASE_RUNNER].head.vocab_size)
    bias[[vocab["]"], vocab["}]"]]] = 20.0  # a model that closes its list of calls (where the grammar lets it)
    outputs = {}
    for rid, opener in (("list", "["), ("spaced", "Ġ["), ("object", '{"')):  # a list, " [" (a space first), an object
        bias[vocab[opener]] = 30.0
        with biased(engine, bias):
            outputs |= run(engine, chat(rid, spec, max_tokens=64), chat(f"{rid}-pad", spec, preferences=[PREF],
                                                                         weight=4.0, temperature=1.0, seed=1, max_tokens=64))
        bias[vocab[opener]] = 0.0
    for rid, outs in outputs.items():
        last = outs[-1]
        assert last.finish_reason == "stop" and last.tool_calls, (rid, text_of(outs))
        assert all(call.name in ("get_weather", "get_time") for call in last.tool_calls)
        calls = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in last.tool_calls]
        assert json.loads(text_of(outs)) == (calls[0] if rid.startswith("object") else calls)
    two = '[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]'
    matcher = engine.structured.start(spec)
    for token in engine.tokenizer(two, add_special_tokens=False)["input_ids"]:
        matcher.consume(token)
    assert matcher.done and matcher.error is None  # parallel calls, joined as json.dumps joins them
    bias[vocab["Hello"]] = 30.0  # a model that wants to talk
    with biased(engine, bias):
        outputs = run(engine, chat("text", spec, max_tokens=8), chat("text-pad", spec, preferences=[PREF], weight=4.0,
                                                                       max_tokens=8))
    for outs in outputs.values():
        assert outs[-1].finish_reason == "length" and outs[-1].tool_calls is None
        assert text_of(outs).startswith("Hello") and len(outs) == 8  # text runs free to the end, token by token
    # Once the first token chose text, the request drops its grammar: the rest is plain decoding, at its cost.
    with biased(engine, bias):
        engine.add_chat(chat("dropped", spec, max_tokens=4))
        engine.step()
        (state,) = engine.running
        assert state.grammar is None and state.generated
        while engine.has_unfinished():
            engine.step()
    # The prompt offers the calls and the plain answer both.
    prompt, _ = engine.prompts.encode_request([{"role": "user", "content": "hi"}], [], False, tools=spec.tools,
                                              optional_tools=True)
    shown = engine.tokenizer.decode(prompt)
    assert "get_weather" in shown and "Otherwise, answer the user directly." in shown


def test_relocated_rewrites_local_references_only():
    schema = {"$defs": {"Place": {"properties": {"city": {"const": {"$ref": "#/data"}}}}},
              "properties": {"place": {"$ref": "#/$defs/Place"}, "self": {"$ref": "#"}, "const": {"$ref": "#/$defs/P"},
                             "other": {"$ref": "https://example.com/s.json"}, "named": {"$ref": "#anchor"}},
              "enum": [{"$ref": "#/kept"}]}
    moved = relocated(schema, "/$defs/tool_f")
    assert moved["properties"]["place"] == {"$ref": "#/$defs/tool_f/$defs/Place"}
    assert moved["properties"]["self"] == {"$ref": "#/$defs/tool_f"}
    assert moved["properties"]["const"] == {"$ref": "#/$defs/tool_f/$defs/P"}  # a property named like a keyword
    assert moved["properties"]["other"] == schema["properties"]["other"]  # not local
    assert moved["properties"]["named"] == schema["properties"]["named"]  # a plain-name fragment
    assert moved["enum"] == schema["enum"] and moved["$defs"]["Place"] == schema["$defs"]["Place"]  # data
    assert relocated(WEATHER.parameters, "/x") == WEATHER.parameters  # nothing to move: left in place
    own = {"$id": "https://example.com/s.json", "$defs": {"X": {}}, "properties": {"a": {"$ref": "#/$defs/X"}}}
    assert relocated(own, "/x") == own  # a resource of its own: its references resolve against its $id
    assert relocated({"properties": {"b": own}}, "/x") == {"properties": {"b": own}}


def test_tightened_refuses_unlisted_keys_unless_the_schema_allows_them():
    """instructor's and pydantic's schemas leave additionalProperties out:
    read as false (xgrammar's and outlines' reading), every object that
    lists properties is closed, nested, in $defs, in unions and arrays;
    what says otherwise, and data, are kept."""
    schema = {
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}, "tags": {"type": "array", "items": {"properties": {"t": {}}}},
                       "properties": {"type": "string"},  # a property named like the keyword
                       "either": {"anyOf": [{"properties": {"a": {}}}, {"type": "null"}]},
                       "free": {"type": "object", "properties": {"x": {}}, "additionalProperties": True},
                       "scores": {"type": "object", "additionalProperties": {"type": "integer"}}},
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}},
        "default": {"properties": {"kept": "as data"}},
        "not": {"properties": {"c": {}}},
    }
    closed = tightened(schema)
    assert closed["additionalProperties"] is False
    assert closed["$defs"]["Place"]["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert closed["properties"]["properties"] == {"type": "string"}
    assert closed["properties"]["free"]["additionalProperties"] is True
    assert closed["properties"]["scores"]["additionalProperties"]["type"] == "integer"  # a map: kept open
    assert closed["default"] == schema["default"] and closed["not"] == schema["not"]
    assert "additionalProperties" not in schema  # the client's schema is not changed
    assert tightened({"type": "object"}) == {"type": "object"}  # json_object: any object


@pytest.mark.parametrize("schema", [
    # keys that come from beside the listed properties (regression: these became unsatisfiable)
    {"properties": {"a": {}}, "allOf": [{"properties": {"b": {}}, "required": ["b"]}]},
    {"properties": {"kind": {}}, "required": ["kind"], "oneOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
    {"properties": {"kind": {}}, "anyOf": [{"properties": {"x": {}}, "required": ["x"]}]},
    {"properties": {"a": {}}, "required": ["a", "b"]},
    {"properties": {"kind": {}}, "if": {"properties": {"kind": {"const": "k"}}}, "then": {"properties": {"x": {}}}},
    {"properties": {"a": {}}, "$ref": "#/$defs/B", "$defs": {"B": {"properties": {"b": {}}}}},
])
def test_tightened_leaves_open_an_object_whose_keys_come_from_elsewhere_too(schema, engine):
    closed = tightened(schema)
    assert "additionalProperties" not in closed
    for member in closed.get("allOf", []) + closed.get("anyOf", []) + closed.get("oneOf", []):
        assert "additionalProperties" not in member
    for spec in (StructuredOutput("json_schema", json_schema=schema),
                 StructuredOutput("tool_calls", tools=(ToolFunction("f", None, schema),))):
        engine.structured.start(spec)  # compiles (was a 400: "Unsatisfiable schema")


def test_an_unbounded_integer_gets_at_most_18_digits():
    """Regression: small models wrote 30-60 digit numbers until max_tokens."""
    assert tightened({"type": "integer"}) == {"type": "integer", "minimum": -(10**18 - 1), "maximum": 10**18 - 1}
    assert tightened({"type": "integer", "minimum": 0}) == {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
    assert tightened({"type": "integer", "exclusiveMaximum": 5})["minimum"] == -(10**18 - 1)
    assert "maximum" not in tightened({"type": "integer", "exclusiveMaximum": 5})
    assert tightened({"type": "number"}) == {"type": "number"}
    assert tightened({"type": ["integer", "null"]})["maximum"] == 10**18 - 1
    assert tightened({"type": "integer", "minimum": 10**20}) == {"type": "integer", "minimum": 10**20}  # not below it


def test_a_key_the_schema_does_not_list_is_not_legal(engine):
    """Regression (instructor's default tool mode): a schema without
    additionalProperties let the model add keys until max_tokens."""
    listed = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    for spec in (StructuredOutput("json_schema", json_schema=listed),
                 StructuredOutput("tool_calls", tools=(ToolFunction("f", None, listed),), tool_choice="f")):
        prefix = '{"city": "Paris"' if spec.kind == "json_schema" else '[{"name": "f", "arguments": {"city": "Paris"'
        matcher = engine.structured.start(spec)
        for token in engine.tokenizer.encode(prefix, add_special_tokens=False):
            matcher.consume(token)
        assert next_pieces(engine, matcher) == {"}"}, spec.kind  # "}" or "}}": the object closes, nothing else
    opened = {**listed, "additionalProperties": True}
    matcher = engine.structured.start(StructuredOutput("json_schema", json_schema=opened))
    for token in engine.tokenizer.encode('{"city": "Paris"', add_special_tokens=False):
        matcher.consume(token)
    assert next_pieces(engine, matcher) == {"}", ","}
    count = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    matcher = engine.structured.start(StructuredOutput("json_schema", json_schema=count))
    for token in engine.tokenizer.encode('{"n": 123456789012345678', add_special_tokens=False):
        matcher.consume(token)
    assert matcher.error is None and next_pieces(engine, matcher) == {"}"}  # no 19th digit


def next_pieces(engine, matcher) -> set[str]:
    """The first characters of the tokens the matcher allows next."""
    allowed = matcher.allowed(len(engine.tokenizer)).nonzero().flatten().tolist()
    return {engine.tokenizer.decode([token])[:1] for token in allowed}


def test_tools_whose_parameters_refer_to_their_own_defs(engine):
    """Regression: parameters made from nested pydantic models (`$defs` and
    "#/$defs/..." references, as openai-agents, LangChain and the openai SDK's
    pydantic_function_tool send them) were refused as invalid schemas: inside
    the calls' schema their references pointed at its root."""
    place = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
             "additionalProperties": False}
    nested = ToolFunction("plan_trip", None, {
        "$defs": {"Place": place}, "type": "object", "properties": {
            "start": {"$ref": "#/$defs/Place"}, "end": {"$ref": "#/$defs/Place"}},
        "required": ["start", "end"], "additionalProperties": False})
    tree = ToolFunction("tree", None, {"type": "object", "properties": {"child": {"$ref": "#"}}})  # recursive
    for spec in (StructuredOutput("tool_calls", tools=(nested, tree), tool_choice="plan_trip"),
                 StructuredOutput("tool_calls", tools=(nested, tree), auto=True),
                 StructuredOutput("tool_calls", tools=(nested, TIME))):
        engine.structured.start(spec)  # compiles
    spec = StructuredOutput("tool_calls", tools=(nested, TIME), tool_choice="plan_trip")
    last = run(engine, chat("trip", spec, max_tokens=64))["trip"][-1]
    (call,) = last.tool_calls
    arguments = json.loads(call.arguments)
    assert call.name == "plan_trip" and {arguments["start"]["city"], arguments["end"]["city"]} <= {"Paris", "Rome"}


def test_auto_with_a_response_format_answers_calls_or_that_json(engine):
    """tool_choice "auto" with a response_format (an agent with tools and an
    output type): the answer is the calls or the format's JSON, never free
    text; one call's object is no option, since the JSON opens with "{"."""
    spec = StructuredOutput("tool_calls", tools=(WEATHER, TIME), auto=True, json_schema=SCHEMA)
    vocab = engine.tokenizer.get_vocab()
    first = engine.structured.start(spec).allowed(engine.runners[BASE_RUNNER].head.vocab_size)
    assert first[vocab["["]] and first[vocab["{"]] and not first[vocab["Hello"]]
    bias = torch.zeros(engine.runners[BASE_RUNNER].head.vocab_size)
    bias[[vocab['"'], vocab["}"], vocab['"}'], vocab["]"], vocab["}]"]]] = 20.0  # closes what it opens
    bias[vocab['{"']] = 30.0  # an object: the format's answer (a call would open with "[")
    with biased(engine, bias):
        outs = run(engine, chat("answer", spec, max_tokens=64))["answer"]
    assert outs[-1].finish_reason == "stop" and outs[-1].tool_calls is None
    assert matches_schema(json.loads(text_of(outs)))
    bias[vocab["["]] = 40.0  # a model that wants to call
    with biased(engine, bias):
        last = run(engine, chat("call", spec, max_tokens=64))["call"][-1]
    assert last.finish_reason == "stop" and last.tool_calls


def test_a_broken_schema_under_auto_is_named_in_the_clients_terms(engine):
    broken = ToolFunction("f", None, {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}})
    for auto in (False, True):
        spec = StructuredOutput("tool_calls", tools=(TIME, broken), auto=auto)
        with pytest.raises(InvalidRequestError) as refused:
            engine.structured.start(spec)
        assert refused.value.param == "tools[1].function.parameters"
        assert "/$defs/Missing" in str(refused.value) and "tool_f" not in str(refused.value)  # its own pointer
        assert "start:" not in str(refused.value) and len(str(refused.value)) < 700  # no grammar source
    bad_answer = StructuredOutput("tool_calls", tools=(TIME,), auto=True, json_schema={"type": "nonsense"}, strict=True)
    with pytest.raises(InvalidRequestError) as refused:
        engine.structured.start(bad_answer)
    assert refused.value.param == "response_format"


def test_a_call_list_scanner_stops_at_the_first_exact_repeat():
    first = '{"name": "f", "arguments": {"a": "}\\"]"}}'  # braces, brackets and an escaped quote in a string
    other = '{"name": "f", "arguments": {"a": "b"}}'
    text = f"[{first}, {other}, {first}, {other}]"
    scanner, repeats = CallListScanner(), []
    for start in range(0, len(text), 3):  # in pieces, as tokens come
        if scanner.feed(text[start:start + 3]):
            repeats.append(len(scanner.text))
    end = len(f"[{first}, {other}, {first}")
    assert repeats[0] in range(end, end + 3)  # at the repeat's closing brace, not inside its string
    assert scanner.calls == [ToolCall("f", '{"a": "}\\"]"}'), ToolCall("f", '{"a": "b"}')]
    different = CallListScanner()
    assert not different.feed(f"[{first}, {other}]") and different.calls is None
    assert not CallListScanner().feed(first)  # one call's object, not a list: nothing to repeat


def test_calls_in_characters_split_over_tokens_are_compared_and_returned_exactly(engine):
    """Regression: each token decoded alone turned an emoji into U+FFFD, so
    two different calls compared equal and the arguments came back corrupted."""
    say = ToolFunction("say", None, {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
    spec = StructuredOutput("tool_calls", tools=(say,))
    calls = ['{"name": "say", "arguments": {"text": "🎉"}}', '{"name": "say", "arguments": {"text": "🚀"}}',
             '{"name": "say", "arguments": {"text": "東京"}}']

    def feed(text):
        matcher, detokenizer = engine.structured.start(spec), IncrementalDetokenizer(engine.tokenizer.backend_tokenizer)
        for token in engine.tokenizer.encode(text, add_special_tokens=False):
            matcher.consume(token)
            matcher.scan(detokenizer.step(token))  # as RequestState feeds it
            if matcher.repeated:
                break
        return matcher

    different = feed("[" + ", ".join(calls) + "]")
    assert not different.repeated and different.error is None
    repeat = feed("[" + ", ".join([*calls, calls[1]]) + "]")
    assert repeat.repeated and repeat.tool_calls([]) == [
        ToolCall("say", '{"text": "🎉"}'), ToolCall("say", '{"text": "🚀"}'), ToolCall("say", '{"text": "東京"}')]


def test_a_model_that_keeps_repeating_a_call_gets_the_calls_before_the_repeat(engine):
    """Regression: tool_choice "required" with parallel calls (OpenAI's
    default; pydantic-ai, smolagents) and a model that always writes ", "
    after a call ran to max_tokens and the client got text, not calls."""
    vocab = engine.tokenizer.get_vocab()
    bias = torch.zeros(engine.runners[BASE_RUNNER].head.vocab_size)
    bias[[vocab[","], vocab["},"]]] = 40.0  # always another call
    required = StructuredOutput("tool_calls", tools=(TIME,))
    named = StructuredOutput("tool_calls", tools=(TIME,), tool_choice="get_time")
    with biased(engine, bias):
        outputs = run(engine, chat("req", required, max_tokens=120), chat("named", named, max_tokens=120))
    last = outputs["req"][-1]
    assert last.finish_reason == "stop" and last.tool_calls == [ToolCall("get_time", "{}")]
    assert last.completion_tokens < 60  # it ended at the repeat, not at max_tokens
    assert outputs["named"][-1].tool_calls == [ToolCall("get_time", "{}")]  # one call allowed: no scanner needed


def test_auto_text_that_reads_like_a_call_is_text():
    calls = '[{"name": "get_time", "arguments": {}}]'

    class Matcher(GrammarMatcher):
        def __init__(self, spec, text):
            super().__init__(spec, matcher=None, decode=lambda ids: text)

    auto = StructuredOutput("tool_calls", tools=(TIME,), auto=True)
    for text in (calls, calls[1:-1], f" {calls}", f"\n{calls[1:-1]}"):  # a list or one object, spaces first or not
        assert Matcher(auto, text).tool_calls([1]) == [ToolCall("get_time", "{}")]
    for text in (f"Sure: {calls}", '"[]"'):
        assert Matcher(auto, text).tool_calls([1]) is None  # anything else first: the model chose text
    formatted = StructuredOutput("tool_calls", tools=(TIME,), auto=True, json_schema={"type": "object"})
    assert Matcher(formatted, calls).tool_calls([1]) == [ToolCall("get_time", "{}")]
    assert Matcher(formatted, calls[1:-1]).tool_calls([1]) is None  # an object is the response_format's answer
    forced = StructuredOutput("tool_calls", tools=(TIME,))
    assert Matcher(forced, calls[1:-1]).tool_calls([1]) == [ToolCall("get_time", "{}")]  # as before


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        (StructuredOutput("json_schema", json_schema={"type": "objectx"}, strict=True), "response_format"),
        (StructuredOutput("json_schema", json_schema={"type": "string", "pattern": "(("}), "response_format"),
        (StructuredOutput("tool_calls", tools=(TIME, ToolFunction("f", parameters={"type": 3}))),
         "tools[1].function.parameters"),
        (StructuredOutput("tool_calls", tools=(TIME,), tool_choice="get_weather"), "tool_choice"),
        (StructuredOutput("tool_calls", tools=(TIME,), tool_choice="get_time", auto=True), "tool_choice"),
        (StructuredOutput("tool_calls", tools=(TIME, ToolFunction("f", parameters={"type": 3})), auto=True),
         "tools[1].function.parameters"),
        # compiles, but the parser cannot take a first step: refused up front, not answered "" with "stop"
        (StructuredOutput("json_schema", json_schema={"$ref": "#"}), "response_format"),
        (StructuredOutput("json_schema", json_schema={"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}),
         "response_format"),
        # an integer msgpack cannot carry (StructuredOutput.verify)
        (StructuredOutput("json_schema", json_schema={"type": "integer", "minimum": 2**64}), "response_format"),
        (StructuredOutput("tool_calls", tools=(ToolFunction("f", parameters={"maxProperties": -(2**63) - 1}),)),
         "tools[0].function.parameters"),
        # vLLM's regex, choice and grammar constraints, named by the field they came from
        (StructuredOutput("regex", regex="(unclosed", source="guided_regex"), "guided_regex"),
        (StructuredOutput("regex", regex="", source="structured_outputs.regex"), "structured_outputs.regex"),
        (StructuredOutput("choice", choices=(), source="guided_choice"), "guided_choice"),
        (StructuredOutput("choice", choices=("a", ""), source="guided_choice"), "guided_choice"),
        (StructuredOutput("grammar", grammar='root ::= "yes | "no"', source="guided_grammar"), "guided_grammar"),
        (StructuredOutput("grammar", grammar="start: undefined_rule", source="structured_outputs.grammar"),
         "structured_outputs.grammar"),
    ],
)
def test_invalid_schema_is_an_invalid_request_and_the_engine_goes_on(engine, spec, param):
    with pytest.raises(InvalidRequestError) as error:
        engine.add_chat(chat("bad", spec))
    assert error.value.param == param
    assert not engine.has_unfinished()
    outs = run(engine, chat("ok", StructuredOutput("json_schema", json_schema=SCHEMA)))["ok"]
    assert matches_schema(json.loads(text_of(outs)))


def test_default_max_tokens_applies_when_the_request_gives_none(make_engine):
    engine = make_engine(default_max_tokens=5)
    request = ChatRequest("r", [{"role": "user", "content": "Hi"}], sampling=SamplingParams(temperature=0.0))
    last = run(engine, request)["r"][-1]
    assert last.finish_reason == "length" and last.completion_tokens == 5


def test_a_grammar_that_fails_while_decoding_ends_its_request_alone_as_the_clients_fault(engine, monkeypatch):
    """llguidance can fail mid-answer (a schema with no finite instance hits
    its parser limits): the request ends with "error" naming response_format
    (a 400 at the gateway), even when the token drawn from the unmasked row
    is an end-of-sequence, which must not pass for a complete answer."""
    start = engine.structured.start

    def failing_start(spec):
        matcher = start(spec)
        matcher.write_mask = lambda address, size: False  # the parser gave up computing the mask
        return matcher

    monkeypatch.setattr(engine.structured, "start", failing_start)
    bias = torch.zeros(engine.runners[BASE_RUNNER].head.vocab_size)
    bias[list(engine.stop_token_ids)] = 100.0  # the unmasked row would end at once
    with biased(engine, bias):
        outputs = run(engine, chat("broken", StructuredOutput("json_object")), chat("free", max_tokens=8))
    (broken,) = outputs["broken"]
    assert broken.finish_reason == "error" and broken.error_param == "response_format" and broken.text == ""
    assert broken.error.startswith("structured output:")
    assert outputs["free"][-1].finish_reason == "stop" and outputs["free"][-1].error is None
    (sent,) = unpack(pack({"type": "outputs", "outputs": [broken.to_dict()]}))["outputs"]
    assert StepOutput.from_dict(sent) == broken  # error_param crosses the IPC


def test_tightened_leaves_open_what_a_reference_shares_and_never_contradicts_an_enum():
    """Review regressions: a $defs entry used through allOf (OpenAPI
    inheritance) or beside properties stays open, and so does anything in a
    composition nested in an allOf member; an integer enum or const keeps
    its values, past 18 digits too."""
    inherited = tightened({"$defs": {"Base": {"type": "object", "properties": {"id": {"type": "integer"}}}},
                           "allOf": [{"$ref": "#/$defs/Base"}], "properties": {"id": {}, "name": {}}})
    assert "additionalProperties" not in inherited["$defs"]["Base"]
    beside = tightened({"$defs": {"B": {"properties": {"b": {}}}}, "$ref": "#/$defs/B", "properties": {"a": {}}})
    assert "additionalProperties" not in beside["$defs"]["B"]
    alone = tightened({"$defs": {"B": {"properties": {"b": {}}}}, "properties": {"x": {"$ref": "#/$defs/B"}}})
    assert alone["$defs"]["B"]["additionalProperties"] is False  # a plain reference: closed as before
    nested = tightened({"properties": {"a": {}}, "allOf": [{"anyOf": [{"properties": {"b": {}}}]}]})
    assert "additionalProperties" not in nested["allOf"][0]["anyOf"][0]
    assert tightened({"type": "integer", "enum": [10**19]}) == {"type": "integer", "enum": [10**19]}
    assert tightened({"type": "integer", "const": -(10**19)}) == {"type": "integer", "const": -(10**19)}


def test_the_repeat_check_tells_true_from_1_and_returns_the_calls_as_written():
    scanner = CallListScanner()
    assert not scanner.feed('[{"name": "f", "arguments": {"a": true}}, {"name": "f", "arguments": {"a": 1}}')
    assert scanner.feed(', {"name": "f", "arguments": {"a": 1}}')
    assert scanner.calls == [ToolCall("f", '{"a": true}'), ToolCall("f", '{"a": 1}')]


# ---- vLLM's text constraints: regex, choice, grammar ----------------------------------
TEXT_SPECS = {
    "regex": (StructuredOutput("regex", regex=r"(yes|no), [a-z]{1,6}\.", source="structured_outputs.regex"),
              lambda text: re.fullmatch(r"(yes|no), [a-z]{1,6}\.", text)),
    "choice": (StructuredOutput("choice", choices=("positive", "negative", "neutral 😐")),
               lambda text: text in ("positive", "negative", "neutral 😐")),
    "gbnf": (StructuredOutput("grammar", grammar='root ::= "The answer is " num "."\nnum ::= [0-9] | [1-9] [0-9]'),
             lambda text: re.fullmatch(r"The answer is (\d|[1-9]\d)\.", text)),
    "lark": (StructuredOutput("grammar", grammar='start: ("ok" | "fine") ("!" | "?")'),
             lambda text: text in ("ok!", "ok?", "fine!", "fine?")),
}


@pytest.mark.parametrize("name", sorted(TEXT_SPECS))
def test_regex_choice_and_grammar_answers_match_greedy_sampled_and_guided(engine, name):
    spec, matches = TEXT_SPECS[name]
    outputs = run(engine, chat("greedy", spec), chat("sampled", spec, temperature=1.0, seed=4),
                  chat("pad", spec, preferences=[PREF], weight=4.0, top_k=20),
                  chat("free", max_tokens=8))
    for rid in ("greedy", "sampled", "pad"):
        outs = outputs[rid]
        assert outs[-1].finish_reason == "stop", (name, rid)
        assert matches(text_of(outs)), (name, rid, text_of(outs))
    assert outputs["free"][-1].finish_reason == "length"


def test_text_constraints_round_trip_through_ipc():
    for spec, _ in TEXT_SPECS.values():
        message = unpack(pack({"type": "add", "request": chat("r", spec).to_dict()}))
        assert ChatRequest.from_dict(message["request"]).structured == spec
    text = TextRequest("t", "Q: yes or no?", structured=TEXT_SPECS["choice"][0])
    message = unpack(pack({"type": "add", "request": text.to_dict()}))
    assert TextRequest.from_dict(message["request"]) == text


def test_a_costly_constraint_fails_alone_and_early(engine):
    """'(a{700}){700}' is 15 characters that took ~0.2 s a step for every row
    (every stream waited): the lexer fuel refuses it at its second step."""
    spec = StructuredOutput("regex", regex="(a{700}){700}", source="guided_regex")
    outputs = run(engine, chat("costly", spec, max_tokens=40), chat("plain", max_tokens=8))
    last = outputs["costly"][-1]
    assert last.finish_reason == "error" and last.error_param == "guided_regex", last
    assert len(outputs["costly"]) <= 3
    assert outputs["plain"][-1].finish_reason == "length"


def test_a_step_over_the_mask_budget_ends_its_request(engine, monkeypatch):
    import pad_core.structured as structured

    monkeypatch.setattr(structured, "MAX_MASK_SECONDS", 0.0)  # every mask is over it
    outputs = run(engine, chat("slow", TEXT_SPECS["regex"][0]), chat("plain", max_tokens=4))
    slow = outputs["slow"]
    assert slow[-1].finish_reason == "error" and "too costly" in slow[-1].error
    assert slow[-1].error_param == "structured_outputs.regex"
    assert len(slow) == structured.MASK_STRIKES  # one slow step is forgiven (a pause of the machine)
    assert outputs["plain"][-1].finish_reason == "length"


def test_a_large_tool_set_compiles_with_the_default_lexer_fuel(engine):
    tools = tuple(ToolFunction(f"tool_{i}", None, {"type": "object", "properties": {
        f"p{j}": {"type": "string"} for j in range(4)}, "required": ["p0"]}) for i in range(64))
    engine.structured.start(StructuredOutput("tool_calls", tools=tools, auto=True))  # refused with a tenth of it


def test_the_grammar_is_compiled_as_the_request_is_prepared_not_on_the_decode_loop(engine, monkeypatch):
    compiled = []
    original = engine.structured._compile
    monkeypatch.setattr(engine.structured, "_compile", lambda *a: compiled.append(1) or original(*a))
    spec = StructuredOutput("regex", regex="(yes|no|maybe) [0-9]{1,9}")
    request = engine.prepare_chat(chat("r", spec))  # the worker's tokenizer thread
    assert compiled == [1]
    engine.add_request(request)
    outs = run(engine)["r"]
    assert compiled == [1] and outs[-1].finish_reason == "stop"


def test_lark_and_gbnf_are_told_apart_and_a_whitespace_pattern_is_for_json_only(engine):
    from pad_core.structured import is_gbnf

    assert is_gbnf('root ::= "a"') and not is_gbnf('?start: x\nx: "a"') and not is_gbnf('start: "a"')
    spaced = StructuredOutput("json_schema", json_schema={"type": "object", "properties": {"k": {"enum": [1]}},
                                                          "required": ["k"]}, whitespace_pattern="[ ]{2}")
    matcher = engine.structured.start(spaced)
    for token in engine.tokenizer('{  "k"  :  1  }', add_special_tokens=False)["input_ids"]:
        matcher.consume(token)
    assert matcher.error is None and matcher.done
    with pytest.raises(InvalidRequestError):
        check_spec(StructuredOutput("regex", regex="a", whitespace_pattern=" "))


def test_logprobs_are_those_of_the_legal_tokens(engine):
    """A constrained answer's logprobs report the distribution its tokens
    were chosen from: the grammar's legal tokens share all the probability,
    and a forbidden one is at the floor, never a likely alternative; on plain
    and PAD rows alike."""
    import dataclasses

    from pad_core.engine import MIN_LOGPROB

    spec, matches = TEXT_SPECS["choice"]
    words = spec.choices
    requests = [chat("plain", spec), chat("pad", spec, preferences=[PREF], weight=4.0, top_k=20)]
    requests = [dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, logprobs=True,
                                                                         top_logprobs=20))
                for request in requests]
    for rid, outs in run(engine, *requests).items():
        assert matches(text_of(outs)), (rid, text_of(outs))
        entries = [entry for out in outs for entry in out.logprobs or ()]
        assert len(entries) == sum(len(out.token_ids) for out in outs) > 0
        for entry in entries:
            legal = {text: logprob for text, logprob, _ in entry.top_logprobs if logprob > MIN_LOGPROB}
            assert entry.logprob > MIN_LOGPROB and legal, (rid, entry)
        # The first token: a piece of one of the words, and those pieces (fewer
        # than 20) hold all the probability.
        first = {text: logprob for text, logprob, _ in entries[0].top_logprobs if logprob > MIN_LOGPROB}
        assert all(any(word.startswith(text) for word in words) for text in first), first
        assert abs(sum(torch.tensor(list(first.values())).exp().tolist()) - 1) < 1e-3, (rid, first)
