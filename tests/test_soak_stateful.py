"""The soak's checks of the stateful APIs (benchmarks/soak.py): conversations'
items in order, kept responses' input items, preference profiles and
feedback records, and a Responses stream that ends in an error event."""

from __future__ import annotations

from benchmarks.soak import (
    Outcome,
    Turn,
    conversation_problems,
    feedback_problems,
    input_items_problems,
    item_key,
    patched,
    preference_list,
    profile_problems,
    read_responses_events,
)


def user_item(text: str, item_id: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}],
            "status": "completed", "id": item_id}


def answer_item(text: str, item_id: str) -> dict:
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def response(response_id: str, text: str, input_tokens: int) -> dict:
    return {"id": response_id, "output": [answer_item(text, "msg_" + response_id)],
            "usage": {"input_tokens": input_tokens}}


BEFORE = [user_item("My name is Ada.", "msg_0")]
A = response("a", "Hello Ada", 20)
B = response("b", "Rome", 30)


def test_item_keys_read_every_shape_a_message_is_sent_in():
    assert item_key({"role": "user", "content": "Hi"}) == ("message", "user", "Hi")
    assert item_key(user_item("Hi", "x")) == ("message", "user", "Hi")
    assert item_key(answer_item("Yo", "y")) == ("message", "assistant", "Yo")


def test_a_conversation_holding_its_turns_in_order_passes():
    listed = [*BEFORE, user_item("Hi", "m1"), A["output"][0], user_item("Capital?", "m2"), B["output"][0]]
    turns = [Turn.of("Hi", A), Turn.of([{"role": "user", "content": "Capital?"}], B)]
    assert conversation_problems(listed, BEFORE, turns) == []
    assert conversation_problems(listed, BEFORE, turns[::-1], any_order=True) == []


def test_turns_out_of_order_interleaved_lost_or_extra_fail():
    turns = [Turn.of("Hi", A), Turn.of("Capital?", B)]
    swapped = [*BEFORE, user_item("Capital?", "m2"), B["output"][0], user_item("Hi", "m1"), A["output"][0]]
    assert conversation_problems(swapped, BEFORE, turns)  # the order asked for
    interleaved = [*BEFORE, user_item("Hi", "m1"), user_item("Capital?", "m2"), A["output"][0], B["output"][0]]
    assert conversation_problems(interleaved, BEFORE, turns, any_order=True)
    lost = [*BEFORE, user_item("Hi", "m1"), A["output"][0]]
    assert any("missing" in p for p in conversation_problems(lost, BEFORE, turns))
    extra = [*BEFORE, user_item("Hi", "m1"), A["output"][0], user_item("Hi", "m9")]
    assert any("no turn added" in p for p in conversation_problems(extra, BEFORE, turns[:1]))
    wrong_answer = [*BEFORE, user_item("Hi", "m1"), answer_item("Hello Bob", A["output"][0]["id"])]
    assert conversation_problems(wrong_answer, BEFORE, turns[:1])
    changed = [user_item("My name is Bob.", "msg_0"), user_item("Hi", "m1"), A["output"][0]]
    assert any("held before changed" in p for p in conversation_problems(changed, BEFORE, turns[:1]))
    repeated_ids = [*BEFORE, user_item("Hi", "msg_0"), A["output"][0]]
    assert any("repeated" in p for p in conversation_problems(repeated_ids, BEFORE, turns[:1]))


def test_a_turn_that_did_not_read_the_one_before_fails():
    unread = response("b", "Rome", 20)  # no more input tokens than turn a's
    listed = [user_item("Hi", "m1"), A["output"][0], user_item("Capital?", "m2"), unread["output"][0]]
    problems = conversation_problems(listed, [], [Turn.of("Hi", A), Turn.of("Capital?", unread)])
    assert problems and "did not read" in problems[0]


def test_input_items_are_the_input_sent_in_order():
    listed = [user_item("Hi", "m1"), user_item("There", "m2")]
    sent = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "There"}]
    assert input_items_problems(sent, listed) == []
    assert input_items_problems(sent, listed[::-1])
    assert input_items_problems("Hi", [user_item("Hi", "")])  # no id
    assert input_items_problems("Hi", [{"type": "message", "role": "user", "content": "Hi", "id": "m"}])  # no parts


def test_profiles_after_put_and_patch():
    stored = preference_list(["short", {"text": "funny", "weight": 0.5}])
    assert stored == [{"text": "short", "weight": 1.0}, {"text": "funny", "weight": 0.5}]
    assert patched(stored, [{"text": "funny", "weight": 2.0}, "formal"], ["short", "absent"]) == [
        {"text": "funny", "weight": 2.0}, {"text": "formal", "weight": 1.0}]
    profile = {"object": "user.preferences", "user": "u", "preferences": stored, "created_at": 5, "updated_at": 6}
    assert profile_problems(profile, "u", stored) == []
    assert profile_problems({**profile, "updated_at": 4}, "u", stored)
    assert profile_problems(profile, "u", stored[::-1])


def test_feedback_records_say_what_was_sent():
    sent = {"completion_id": "chatcmpl-1", "rating": "Up", "preferred_over": "chatcmpl-2"}
    record = {"id": "fb-1", "object": "feedback", "created_at": 7, "completion_id": "chatcmpl-1", "choice_index": 0,
              "user": "u", "rating": "up", "preferred_over": "chatcmpl-2", "preferred_over_choice_index": 0,
              "comment": None}
    assert feedback_problems(sent, record, "u") == []
    assert feedback_problems(sent, {**record, "rating": "down"}, "u")
    assert feedback_problems({"completion_id": "chatcmpl-1", "rating": 3},
                             {**record, "rating": 3, "preferred_over": None, "preferred_over_choice_index": None},
                             "u") == []


def test_a_responses_stream_ending_in_an_error_event_then_response_failed():
    events = [("response.created", {"type": "response.created", "sequence_number": 0}),
              ("error", {"type": "error", "sequence_number": 1, "code": "x", "message": "m", "param": None}),
              ("response.failed", {"type": "response.failed", "sequence_number": 2})]
    out = Outcome("t", 0.0)
    assert read_responses_events(out, events, {"max_output_tokens": 8}) is None
    assert out.stream_error is not None and not out.violations
    allowed = Outcome("t", 0.0)
    assert read_responses_events(allowed, events, {"max_output_tokens": 8}, error_ok=True) is None
    assert allowed.stream_error is None and not allowed.violations
