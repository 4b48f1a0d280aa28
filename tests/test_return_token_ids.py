"""vLLM's return_token_ids (the prompt's token ids, and the answer's with
every choice and chunk) and return_tokens_as_token_ids (logprobs name
tokens "token_id:{id}"). The engine's first output, ChoiceState's
bookkeeping as pure data (ids are never lost or repeated, whatever is held
back), then over HTTP: streamed ids add up to the whole answer's, and they
are the tokens the answer's text and usage count."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_helpers import tiny_gateway

from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams, StepOutput, StructuredOutput, ToolFunction
from server.generation import ChoiceState

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "How do I sleep better at night?"}]
PREF = [Preference("I like short answers with a bit of humour")]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}


# ---- the engine ----------------------------------------------------------
@pytest.mark.parametrize("preferences", [(), PREF], ids=["plain", "pad"])
def test_the_first_output_alone_carries_the_prompts_ids(make_engine, preferences):
    engine = make_engine()
    sampling = SamplingParams(max_tokens=5, temperature=0.0, return_token_ids=True, truncate_prompt_tokens=9)
    asked = ChatRequest("asked", MESSAGES, list(preferences), sampling, GuidanceParams(weight=2.0))
    plain = ChatRequest("plain", MESSAGES, list(preferences), SamplingParams(max_tokens=5, temperature=0.0),
                        GuidanceParams(weight=2.0))
    outputs: dict[str, list[StepOutput]] = {}
    for output in engine.generate([asked, plain]):
        outputs.setdefault(output.request_id, []).append(output)
    first, *rest = outputs["asked"]
    assert first.prompt_token_ids == engine.prepare_chat(asked).prompt_ids  # truncated: what the model read
    assert len(first.prompt_token_ids) == 9 == first.prompt_tokens
    assert all(o.prompt_token_ids is None for o in rest)
    assert all(o.prompt_token_ids is None for o in outputs["plain"])
    assert StepOutput.from_dict(first.to_dict()) == first  # across the worker's IPC


# ---- pure: ChoiceState ----------------------------------------------------
piece = st.tuples(st.sampled_from(["", "", " ", "Hi", " there", "[", '{"name": "f", ', '"arguments": {}}', "]"]),
                  st.lists(st.integers(0, 500), min_size=1, max_size=2))


@settings(deadline=None)  # pure and fast: a pause of a busy machine must not fail it
@given(st.lists(piece, min_size=1, max_size=12), st.sampled_from([None, "auto", "forced"]),
       st.sampled_from(["stop", "length"]))
def test_every_token_id_is_sent_once_in_order(pieces, structured, finish):
    """Outputs whose text is held (tool_choice auto undecided, calls being
    written, nothing new) send no delta; their ids go with the next one,
    and the last delta (it has the finish_reason) takes what is left."""
    kind = {None: None, "auto": StructuredOutput("tool_calls", tools=(ToolFunction("f"),), auto=True),
            "forced": StructuredOutput("tool_calls", tools=(ToolFunction("f"),))}[structured]
    choice = ChoiceState.of(0, kind)
    sent: list[int] = []
    for index, (text, ids) in enumerate(pieces):
        last = index == len(pieces) - 1
        delta = choice.update(StepOutput("r", ids, text, finish if last else None, 3, index + 1))
        if delta:
            sent += delta.token_ids
        else:
            assert not delta.token_ids
    every = [token for _, ids in pieces for token in ids]
    assert sent == every == choice.token_ids


def test_ids_of_a_delta_that_sent_nothing_go_with_the_next():
    choice = ChoiceState(0)
    first = choice.update(StepOutput("r", [1, 2], "a", None, 3, 2))
    choice.defer_ids(first.token_ids)
    second = choice.update(StepOutput("r", [3], "b", "stop", 3, 3))
    assert second.token_ids == [1, 2, 3] and choice.token_ids == [1, 2, 3]


# ---- over HTTP -------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_gateway(tmp_path_factory.mktemp("ids")) as url:
        yield url


def post(server: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def sse(server: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("preference", [None, "I like short answers"], ids=["plain", "pad"])
def test_chat_ids_are_the_answers_tokens_streamed_or_whole(server, tokenizer, preference):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "n": 2,
            "return_token_ids": True, "stop": ["\n\n"], "preference": preference}
    whole = post(server, "/v1/chat/completions", body)
    prompt = whole["prompt_token_ids"]
    assert len(prompt) == whole["usage"]["prompt_tokens"]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    for choice in whole["choices"]:
        ids = choice["token_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True).startswith(choice["message"]["content"])
    assert sum(len(c["token_ids"]) for c in whole["choices"]) == whole["usage"]["completion_tokens"]
    chunks = sse(server, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    for choice in whole["choices"]:
        streamed = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]
                    and "role" not in c["choices"][0]["delta"]]  # the role chunks, as vLLM's, have no ids
        assert all("token_ids" in part for part in streamed)
        assert [t for part in streamed for t in part["token_ids"]] == choice["token_ids"]


def test_chat_without_the_fields_has_none_of_them(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "logprobs": True}
    whole = post(server, "/v1/chat/completions", body)
    assert "prompt_token_ids" not in whole and "token_ids" not in whole["choices"][0]
    assert not whole["choices"][0]["logprobs"]["content"][0]["token"].startswith("token_id:")
    chunks = sse(server, "/v1/chat/completions", body)
    assert not any("prompt_token_ids" in c or any("token_ids" in p for p in c["choices"]) for c in chunks)


def test_streamed_tool_calls_send_every_id(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "How do I sleep better?"}], "max_tokens": 60,
            "temperature": 0, "tools": [WEATHER],
            "tool_choice": "required", "return_token_ids": True}
    whole = post(server, "/v1/chat/completions", body)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["token_ids"]
    chunks = sse(server, "/v1/chat/completions", body)
    parts = [c["choices"][0] for c in chunks[1:] if c["choices"]]
    assert all("token_ids" in part for part in parts)  # every choice chunk, as vLLM's
    assert [t for part in parts for t in part["token_ids"]] == choice["token_ids"]
    assert any(part["delta"].get("tool_calls") and part["token_ids"] for part in parts)


def test_logprobs_name_tokens_by_id(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, "return_tokens_as_token_ids": True, "return_token_ids": True}
    choice = post(server, "/v1/chat/completions", body)["choices"][0]
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [f"token_id:{t}" for t in choice["token_ids"]]
    for entry in entries:
        assert len(entry["top_logprobs"]) == 2
        assert all(top["token"].startswith("token_id:") and top["token"][9:].isdigit() for top in entry["top_logprobs"])
    text = bytes(b for e in entries for b in e["bytes"]).decode("utf-8", errors="replace")
    assert text.startswith(choice["message"]["content"])  # bytes stay the tokens' own


def test_completions_ids_per_choice_streamed_or_whole(server, tokenizer):
    prompts = ["Once upon a time", "The capital of France is"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 5, "temperature": 0, "return_token_ids": True,
            "echo": True, "logprobs": 1, "return_tokens_as_token_ids": True}
    whole = post(server, "/v1/completions", body)
    for choice, prompt in zip(whole["choices"], prompts, strict=True):
        assert choice["prompt_token_ids"] == tokenizer(prompt)["input_ids"]
        assert len(choice["token_ids"]) == 5
        tokens = choice["logprobs"]["tokens"]  # the echoed prompt's, then the answer's
        assert tokens == [f"token_id:{t}" for t in choice["prompt_token_ids"] + choice["token_ids"]]
        assert choice["logprobs"]["text_offset"][-1] < len(choice["text"])  # offsets of the text, not the names
    chunks = sse(server, "/v1/completions", body)
    for choice in whole["choices"]:
        streamed = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert streamed[0]["prompt_token_ids"] == choice["prompt_token_ids"]
        assert all("prompt_token_ids" not in part for part in streamed[1:])
        assert [t for part in streamed for t in part["token_ids"]] == choice["token_ids"]


@pytest.mark.parametrize("field", ["return_token_ids", "return_tokens_as_token_ids"])
def test_a_non_boolean_is_a_clear_400(server, field):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, field: "yes please"}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
