"""POST /tokenize and /detokenize (vLLM's shape) over real HTTP, the gateway
in front of a worker on the tiny engine: the count is exactly the prompt a
chat or completion request gives the model, token ids decode back, and bad
input is an OpenAI-shaped 400, never a hang."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread

from pad_core.testing import tiny_engine
from server.app import create_app
from server.settings import ServerSettings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I sleep better?"}]


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def url(engine, tmp_path_factory):
    with worker_thread(engine=engine) as (address, _):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("tokenize"))
        with uvicorn_server(create_app(settings)) as base:
            yield base


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def test_a_chat_counts_what_a_chat_completion_gives_the_model(url, engine):
    answer = post(url, "/tokenize", {"model": "smollm2-135m-instruct", "messages": MESSAGES, "return_token_strs": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = engine.prompts.encode(MESSAGES)
    assert body["tokens"] == expected and body["count"] == len(expected)
    assert body["max_model_len"] == engine.context_length
    assert body["token_strs"] == engine.tokenizer.convert_ids_to_tokens(expected)
    # the same count the chat route's usage reports for that prompt
    usage = post(url, "/v1/chat/completions", {"model": "smollm2-135m-instruct", "messages": MESSAGES,
                                               "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("tool_choice", [None, "auto", "required", {"type": "function", "function": {"name": "get_weather"}},
                                         "none"])
def test_a_chat_with_tools_counts_what_its_chat_completion_gives_the_model(url, tool_choice):
    """The tools are described in the prompt (how depends on tool_choice), as vLLM's /tokenize takes them."""
    choice = {} if tool_choice is None else {"tool_choice": tool_choice}
    answer = post(url, "/tokenize", {"messages": MESSAGES, "tools": [WEATHER], **choice})
    assert answer.status_code == 200, answer.text
    usage = post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "tools": [WEATHER],
                                               **choice}).json()["usage"]
    assert answer.json()["count"] == usage["prompt_tokens"]
    plain = post(url, "/tokenize", {"messages": MESSAGES}).json()["count"]
    assert (answer.json()["count"] == plain) == (tool_choice == "none")
    refused = post(url, "/tokenize", {"messages": MESSAGES, "tool_choice": "required"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"


def test_without_the_generation_prompt_the_assistant_turn_is_not_opened(url, engine):
    opened = post(url, "/tokenize", {"messages": MESSAGES}).json()
    closed = post(url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert closed["count"] < opened["count"] and opened["tokens"][:closed["count"]] == closed["tokens"]
    assert opened["token_strs"] is None


PREFILLED = [*MESSAGES, {"role": "assistant", "content": "Three tips:\n1."}]


def test_continue_final_message_leaves_the_answer_open_to_continue(url, engine):
    """vLLM's prefilled answer: the prompt ends inside the assistant's
    message (no end-of-turn), and the chat route gives the model exactly that."""
    body = {"messages": PREFILLED, "add_generation_prompt": False, "continue_final_message": True}
    tokens = post(url, "/tokenize", body).json()["tokens"]
    assert engine.tokenizer.decode(tokens).endswith("<|im_start|>assistant\nThree tips:\n1.")
    closed = post(url, "/tokenize", {"messages": PREFILLED, "add_generation_prompt": False}).json()["tokens"]
    assert closed[:len(tokens)] == tokens and len(closed) > len(tokens)  # the same, then <|im_end|>
    chat = post(url, "/v1/chat/completions", {"model": "smollm2-135m-instruct", "max_tokens": 3, **body,
                                              "preference": "short answers"})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == len(tokens)


def test_echo_opens_the_answer_with_the_prefilled_message_whole_and_streamed(url):
    body = {"model": "smollm2-135m-instruct", "messages": PREFILLED, "add_generation_prompt": False,
            "continue_final_message": True, "max_tokens": 6, "temperature": 0}
    plain = post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    echoed = post(url, "/v1/chat/completions", {**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == "Three tips:\n1." + plain
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "echo": True, "stream": True},
                      timeout=30) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Three tips:\n1."}
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == echoed
    # the last message is the user's: nothing to echo
    asked = post(url, "/v1/chat/completions", {"model": "smollm2-135m-instruct", "messages": MESSAGES, "max_tokens": 3,
                                               "temperature": 0, "echo": True}).json()
    alone = post(url, "/v1/chat/completions", {"model": "smollm2-135m-instruct", "messages": MESSAGES, "max_tokens": 3,
                                               "temperature": 0}).json()
    assert asked["choices"][0]["message"] == alone["choices"][0]["message"]


def test_chat_template_kwargs_reach_the_template(url, engine):
    """SmolLM2's template reads no such variable, so the prompt is the same
    (clients send enable_thinking to every server); a template that reads one
    changes with it (tests/test_engine.py has that on the prompt builder)."""
    plain = post(url, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    with_kwargs = post(url, "/tokenize", {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}})
    assert with_kwargs.json()["tokens"] == plain
    chat = post(url, "/v1/chat/completions", {"model": "smollm2-135m-instruct", "messages": MESSAGES, "max_tokens": 1,
                                              "chat_template_kwargs": {"enable_thinking": False}})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(plain)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": PREFILLED, "continue_final_message": True}, "continue_final_message"),  # and the generation prompt
    ({"messages": [*MESSAGES, {"role": "assistant", "content": " "}], "add_generation_prompt": False,
      "continue_final_message": True}, "continue_final_message"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"not an identifier": 1}}, "chat_template_kwargs"),
    ({"messages": MESSAGES, "chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"messages": MESSAGES, "continue_final_message": "yes"}, "continue_final_message"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"x": {"y": [1, -(2**64)]}}}, "chat_template_kwargs"),  # no IPC
    ({"messages": MESSAGES, "chat_template_kwargs": {"sanitize_control_tokens": True}}, "chat_template_kwargs"),
])
def test_bad_template_options_are_400s_on_chat_and_tokenize(url, body, param):
    for path, extra in (("/tokenize", {}), ("/v1/chat/completions", {"model": "smollm2-135m-instruct",
                                                                       "max_tokens": 1})):
        answer = post(url, path, {**body, **extra})
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["error"]["param"] == param, (path, answer.json())


def test_a_raw_prompt_counts_what_a_completion_gives_the_model(url, engine):
    body = post(url, "/tokenize", {"prompt": "A recipe for pancakes:\n1."}).json()
    assert body["tokens"] == engine.tokenizer("A recipe for pancakes:\n1.")["input_ids"]
    usage = post(url, "/v1/completions", {"model": "smollm2-135m-instruct", "prompt": "A recipe for pancakes:\n1.",
                                          "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]


def test_detokenize_is_the_inverse(url):
    text = "Sleep well, and drink less coffee. ☕"
    tokens = post(url, "/tokenize", {"prompt": text}).json()["tokens"]
    answer = post(url, "/detokenize", {"model": "smollm2-135m-instruct", "tokens": tokens})
    assert answer.status_code == 200 and answer.json() == {"prompt": text}
    assert post(url, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, None),  # neither prompt nor messages
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, None),  # both
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, None),
    ("/tokenize", {"prompt": "x", "continue_final_message": True}, None),
    ("/tokenize", {"prompt": "x", "chat_template_kwargs": {}}, None),
    ("/tokenize", {"prompt": "x", "tools": [WEATHER]}, None),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ("/tokenize", {"prompt": "x", "temperature": 1}, "temperature"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
    ("/detokenize", {"tokens": "12"}, "tokens"),
])
def test_bad_input_is_a_400_naming_the_parameter(url, path, body, param):
    answer = post(url, path, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_another_model_is_a_404(url):
    answer = post(url, "/tokenize", {"model": "gpt-4o", "prompt": "x"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"


def test_a_prompt_longer_than_the_context_is_counted(url):
    """Counted all the same, as vLLM does: a client asks in order to cut it."""
    body = post(url, "/tokenize", {"prompt": "word " * 20000}).json()
    assert body["count"] > body["max_model_len"]


def test_tokenizer_info_is_what_lm_eval_harness_remote_tokenizer_reads(url, engine):
    """vLLM's GET /tokenizer_info: lm-evaluation-harness checks it (an
    eos_token) and /tokenize, and then tokenizes through the server."""
    info = httpx.get(f"{url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == engine.tokenizer.eos_token and info["chat_template"] == engine.tokenizer.chat_template
    assert info["model_max_length"] == engine.context_length and info["vocab_size"] == len(engine.tokenizer)
    eos = post(url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [engine.tokenizer.eos_token_id]


async def test_a_worker_that_is_down_is_a_503(tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path), start_worker=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        answer = await client.post("/tokenize", json={"prompt": "x"})
        info = await client.get("/tokenizer_info")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "worker_unavailable"
    assert info.status_code == 503


async def test_tokenize_asks_beyond_the_cap_are_429s(tmp_path, monkeypatch):
    """The worker's one tokenizer thread also tokenizes every chat: a few
    /tokenize asks run at once, the next is told to retry (429)."""
    import asyncio

    from server.worker_client import MAX_TOKENIZE_IN_FLIGHT

    app = create_app(ServerSettings(data_dir=tmp_path), start_worker=False)
    release, all_in, arrived = asyncio.Event(), asyncio.Event(), []

    async def slow_ask(message, timeout, forgettable=False):
        arrived.append(message)
        if len(arrived) == MAX_TOKENIZE_IN_FLIGHT:
            all_in.set()
        await release.wait()
        return {"type": "tokenized", "result": {"count": 1, "tokens": [5], "token_strs": None}}

    monkeypatch.setattr(app.state.worker, "_ask", slow_ask)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        held = [asyncio.create_task(client.post("/tokenize", json={"prompt": "x"}))
                for _ in range(MAX_TOKENIZE_IN_FLIGHT)]
        await asyncio.wait_for(all_in.wait(), 60)  # every held ask is in, however slow the machine
        try:
            refused = await asyncio.wait_for(client.post("/tokenize", json={"prompt": "x"}), 60)
        finally:
            release.set()
        answers = await asyncio.gather(*held)
        after = await client.post("/tokenize", json={"prompt": "x"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert [a.status_code for a in answers] == [200] * MAX_TOKENIZE_IN_FLIGHT and after.status_code == 200


def test_a_chat_template_that_refuses_the_messages_is_the_requests_fault():
    """A template's own check (Mistral's "roles must alternate") is a 400
    naming the messages, not an engine error."""
    import jinja2

    from pad_core.worker import refusal

    error = refusal(jinja2.TemplateError("Conversation roles must alternate user/assistant"), "r")
    assert error["param"] == "messages" and "alternate" in error["message"] and "status" not in error
