"""The Responses API's `truncation: "auto"` (ChatRequest.drop_oldest_messages):
a conversation longer than the context loses its oldest messages, never
the leading system ones (instructions) nor the last, and keeps as much as
fits with room for max_tokens: the reward prompts of a preference too. On
the tiny engine (a 512-token context), then over HTTP."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread

from pad_core.errors import ContextLengthExceededError
from pad_core.token_controls import message_cut_points, without_oldest
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams
from server.app import create_app
from server.settings import ServerSettings

SYSTEM = {"role": "system", "content": "Answer as a ship's captain would."}


def conversation(turns: int, words: int = 30) -> list[dict[str, str]]:
    out = [SYSTEM]
    for turn in range(turns):
        out.append({"role": "user", "content": f"Question {turn}: " + "tell me about the sea " * (words // 5)})
        out.append({"role": "assistant", "content": f"Answer {turn}: " + "waves and wind " * (words // 3)})
    out.append({"role": "user", "content": "Last question: where are we sailing?"})
    return out


def request(messages, max_tokens=8, preferences=(), drop=True) -> ChatRequest:
    return ChatRequest("r", messages, list(preferences), SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                       return_token_ids=True),
                       GuidanceParams(), drop_oldest_messages=drop)


def kept_prompt(engine, chat: ChatRequest) -> list[int]:
    return next(iter(engine.generate([chat]))).prompt_token_ids


@pytest.mark.parametrize("preferences", [(), (Preference("short answers, " * 20),)])
def test_the_oldest_messages_leave_until_the_prompts_fit(make_engine, preferences):
    engine = make_engine()
    messages = conversation(12)
    whole, _ = engine.prompts.encode_request(messages, list(preferences), False)
    assert len(whole) > engine.context_length  # the conversation cannot fit whole
    with pytest.raises(ContextLengthExceededError):
        engine.add_chat(request(messages, drop=False, preferences=preferences))
    prompt = kept_prompt(engine, request(messages, preferences=preferences))
    text = engine.tokenizer.decode(prompt)
    assert SYSTEM["content"] in text and "Last question" in text and "Question 0:" not in text
    # the most that fits: the kept part starts at a user message, and the one before it would not fit
    points = message_cut_points(messages)
    start = next(p for p in points if engine.prompts.encode_request(
        [SYSTEM, *messages[p:]], list(preferences), False)[0] == prompt)
    assert messages[start]["role"] == "user"
    longer = engine.prompts.encode_request([SYSTEM, *messages[points[points.index(start) - 1]:]],
                                           list(preferences), False)
    room = engine.context_length - 8
    assert max([len(longer[0]), *(len(r) for r in longer[1])]) > room
    kept = engine.prompts.encode_request([SYSTEM, *messages[start:]], list(preferences), False)
    assert max([len(kept[0]), *(len(r) for r in kept[1])]) <= room  # the reward prompts fit too


def test_a_conversation_that_fits_is_left_whole(make_engine):
    engine = make_engine()
    messages = conversation(1)
    assert kept_prompt(engine, request(messages)) == engine.prompts.encode_request(messages, [], False)[0]


def test_huge_old_messages_leave_before_anything_is_tokenized(make_engine):
    engine = make_engine()
    messages = [SYSTEM, {"role": "user", "content": "x " * 2_000_000}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "And now?"}]
    text = engine.tokenizer.decode(kept_prompt(engine, request(messages)))
    assert "And now?" in text and "x x" not in text


def test_a_last_message_too_long_alone_is_still_the_context_error(make_engine):
    engine = make_engine()
    messages = [SYSTEM, {"role": "user", "content": "old"}, {"role": "user", "content": "sea " * 2000}]
    with pytest.raises(ContextLengthExceededError) as error:
        engine.add_chat(request(messages))
    assert "preference" not in error.value.message  # none was given: the error does not speak of one
    with pytest.raises(ContextLengthExceededError) as error:
        engine.add_chat(request(messages, preferences=[Preference("short answers")]))
    assert "the longest with a preference" in error.value.message
    with pytest.raises(ContextLengthExceededError):  # nor does max_tokens leave room for the prompt
        engine.add_chat(request(conversation(1), max_tokens=engine.context_length))


def test_truncation_auto_over_http(tmp_path):
    items = [{"role": m["role"], "content": m["content"]} for m in conversation(12)[1:]]
    body = {"model": "smollm2-135m-instruct", "input": items, "instructions": SYSTEM["content"],
            "max_output_tokens": 4, "temperature": 0}
    with worker_thread() as (address, _), uvicorn_server(
            create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        refused = httpx.post(f"{url}/v1/responses", json=body, timeout=60)
        answer = httpx.post(f"{url}/v1/responses", json={**body, "truncation": "auto"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert answer.status_code == 200, answer.text
    response = answer.json()
    assert response["truncation"] == "auto" and response["usage"]["input_tokens"] <= 512 - 4


def test_cut_points_start_at_user_messages_and_keep_the_system_ones():
    system, user, assistant = ({"role": role, "content": role} for role in ("system", "user", "assistant"))
    messages = [system, system, user, assistant, user, assistant, assistant]
    # no cut, then user messages only (a template that wants turns to alternate renders every cut);
    # a conversation ending with the assistant is not cut to [system, assistant]
    assert message_cut_points(messages) == [2, 4]
    assert without_oldest(messages, 4) == [system, system, user, assistant, assistant]
    assert without_oldest(messages, 0) == messages  # a point among the system messages cuts nothing
    assert message_cut_points([system]) == [1] and message_cut_points([user]) == [0]
    assert message_cut_points([assistant, user]) == [0, 1]
    assert message_cut_points([system, assistant, assistant]) == [1, 2]  # no user message: the last one


@pytest.mark.parametrize(("old_chars", "max_tokens", "preference"), [
    (41400, 4, ""),  # just past what the context could hold (no off-by-one in the character bound)
    (20000, 300, ""),  # max_tokens counts in that bound
    (41000, 4, "short answers please, " * 40),  # so does the longest preference (880 characters)
])
def test_old_messages_that_could_not_fit_leave_before_the_character_check(make_engine, old_chars, max_tokens,
                                                                          preference):
    engine = make_engine()
    messages = [{"role": "user", "content": "a" * old_chars}, {"role": "user", "content": "And now?"}]
    preferences = [Preference(preference)] if preference else []
    text = engine.tokenizer.decode(kept_prompt(engine, request(messages, max_tokens, preferences)))
    assert "And now?" in text and "aaaa" not in text


def test_many_tiny_messages_are_cut_too(make_engine):
    engine = make_engine()  # each message is at least one token: 50,000 of them cannot fit 512
    messages = [{"role": "user", "content": ""}] * 50_000 + [{"role": "user", "content": "And now?"}]
    prompt = kept_prompt(engine, request(messages))
    assert len(prompt) <= engine.context_length - 8 and "And now?" in engine.tokenizer.decode(prompt)


def test_without_max_tokens_the_default_answer_keeps_its_room(make_engine):
    engine = make_engine()  # default_max_tokens (1024) capped at a quarter of the 512-token context
    outputs = list(engine.generate([request(conversation(12), max_tokens=None)]))
    assert outputs[0].prompt_tokens <= engine.context_length - engine.context_length // 4
    assert outputs[-1].completion_tokens >= engine.context_length // 4 or outputs[-1].finish_reason == "stop"
