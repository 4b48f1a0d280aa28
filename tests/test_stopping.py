"""Stop strings over a stream of text deltas.

The contract: the client never sees any part of a stop string; the text it
sees is the generated text up to (excluding) the first stop string, where
"first" means the first one to be complete as the text streams in, character
by character (as if each character were its own token; among stops completing
at the same character, the one starting earliest). So the result must not
depend on how the text is split into deltas.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pad_core.stopping import StopStringMatcher, longest_partial_stop


def run(deltas: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    """Feeds deltas until a match; flushes at the end when nothing matched.
    Returns what was emitted after each delta (flush last) and the matched stop."""
    matcher = StopStringMatcher(stops)
    emitted = []
    for delta in deltas:
        emitted.append(matcher.feed(delta))
        if matcher.matched is not None:
            return emitted, matcher.matched
    emitted.append(matcher.flush())
    return emitted, None


def expected_output(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference: the text before the first stop string to complete."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s) : end] == s]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_no_stop_strings_passes_text_through():
    assert run(["Hello", " world"], []) == (["Hello", " world", ""], None)
    assert run(["a", "b"], [""]) == (["a", "b", ""], None)  # empty stops are ignored


def test_stop_split_across_deltas_is_never_emitted():
    emitted, matched = run(["Hello wor", "ld and more"], ["world"])
    assert matched == "world"
    assert emitted == ["Hello ", ""]


def test_stop_split_across_three_deltas():
    emitted, matched = run(["The answer: ", "EN", "D", "!"], ["END"])
    assert matched == "END"
    assert emitted == ["The answer: ", "", ""]
    assert "".join(emitted) == "The answer: "


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("x </e") == "x "
    assert matcher.feed("nter") == "</enter"
    assert matcher.matched is None


def test_flush_at_end_returns_held_back_text():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("almost ST") == "almost "
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_several_stops_first_one_in_the_text_wins():
    emitted, matched = run(["one, two. three\n", "four"], ["\n", "."])
    assert matched == "."
    assert "".join(emitted) == "one, two"


def test_text_after_the_stop_in_the_same_delta_is_dropped():
    emitted, matched = run(["abc###def"], ["###"])
    assert (emitted, matched) == (["abc"], "###")


def test_stop_at_the_very_start():
    assert run(["\n\nHi"], ["\n\n"]) == ([""], "\n\n")


def test_longest_partial_stop():
    assert longest_partial_stop("hello wo", ["world"]) == 2
    assert longest_partial_stop("hello", ["world"]) == 0
    assert longest_partial_stop("abab", ["abac", "b"]) == 2  # "ab"; a whole stop ("b") is not partial
    assert longest_partial_stop("x", ["xy", "xyz"]) == 1


def test_result_does_not_depend_on_the_split_when_stops_overlap():
    # "bcd" completes (at character 4) before "abcdef" does (at 6): the stream
    # stops there, whether the text arrives in one delta or two.
    assert "".join(run(["abcd", "ef"], ["bcd", "abcdef"])[0]) == "a"
    assert "".join(run(["abcdef"], ["bcd", "abcdef"])[0]) == "a"


alphabet = st.sampled_from("ab\nc é")


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet, max_size=30),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_property_emitted_text_is_text_up_to_first_stop_for_any_split(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    emitted, matched = run(deltas, stops)
    want, has_stop = expected_output(text, stops)
    assert "".join(emitted) == want
    assert (matched is not None) == has_stop
    if has_stop:
        assert matched in stops
    # Streaming never shows something it later has to take back.
    so_far = ""
    for piece in emitted:
        so_far += piece
        assert want.startswith(so_far)


def test_include_stop_keeps_the_stop_string_and_nothing_after_it():
    matcher = StopStringMatcher(["END", "\n\n"], include_stop=True)
    assert matcher.feed("one E") == "one "  # "E" may begin "END": held back as without include_stop
    assert matcher.feed("ND two") == "END"
    assert matcher.matched == "END"
