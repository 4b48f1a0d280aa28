"""Every check type on hand-written answers, and the spec errors."""

from __future__ import annotations

import pytest

from pad_core.evaluation.checks import (
    CHECKS,
    CheckSpecError,
    bullet_count,
    detect_language,
    heading_count,
    long_word_share,
    mean_sentence_words,
    numbered_count,
    run_check,
    satisfied,
    sentences,
    syllables,
    validate_check,
    words,
)

LIST_ANSWER = "Here you go:\n- drink water\n* sleep well\n• move a bit\n"
NUMBERED_ANSWER = "Steps:\n1. Boil water.\n2) Add the tea.\n**3.** Wait three minutes.\n"
FRENCH = "Pour faire un bon café, il faut de l'eau chaude et des grains moulus que vous versez dans la tasse."
SPANISH = "Para dormir mejor, es importante que no uses el teléfono en la cama y que tengas una rutina."
ENGLISH = "To sleep better, keep a routine and put the phone away in the evening; it is the simplest fix."
HEADED = "# Sleep better\nKeep a routine.\n\n## In the evening\nPut the phone away.\n"
# The same facts for a six-year-old and for an adult reader.
FOR_A_CHILD = ("Fish breathe with gills, not lungs like us. Water has a little bit of air in it. A fish gulps water "
               "with its mouth. The water goes over the gills on the sides of its head. The gills take the air out "
               "of the water. So fish can breathe under the water!")
FOR_AN_ADULT = ("Fish breathe underwater using their gills, which are specialized organs that extract dissolved oxygen "
                "from the water. As water flows over the gill filaments, oxygen diffuses into the blood while carbon "
                "dioxide is released, a process that allows fish to survive in aquatic environments.")

# (check spec, an answer that passes, an answer that fails): one row per type at least.
CASES = [
    ({"type": "max_words", "value": 5}, "Short and sweet, really.", "This answer has far more than five words in it."),
    ({"type": "min_words", "value": 5}, "One two three four five.", "Too short."),
    ({"type": "max_sentences", "value": 2}, "First one. Second one!", "One. Two. Three?"),
    ({"type": "min_sentences", "value": 3}, "One. Two. Three?", "Only one sentence here."),
    ({"type": "min_bullets", "value": 3}, LIST_ANSWER, "- only\n- two bullets"),
    ({"type": "max_bullets", "value": 1}, "A paragraph with no list.", LIST_ANSWER),
    ({"type": "min_numbered", "value": 3}, NUMBERED_ANSWER, LIST_ANSWER),
    ({"type": "contains_any", "values": ["joke", "pun"]}, "Here is a JOKE for you.", "Nothing funny here."),
    ({"type": "contains_all", "values": ["salt", "pepper"]}, "Add salt and pepper.", "Add salt."),
    ({"type": "not_contains", "values": ["coffee"]}, "A hot brewed drink.", "Coffee is great."),
    ({"type": "starts_with", "value": "Hey"}, "  hey there!", "Hello, hey."),
    ({"type": "ends_with", "value": "Cheers!"}, "Bye. cheers!  ", "Cheers! Bye."),
    ({"type": "regex", "pattern": r"^\W*(hey|hi)\b"}, "Hi! Sure.", "High time we talk."),
    ({"type": "not_regex", "pattern": r"\d"}, "No digits at all.", "There are 3 ways."),
    ({"type": "language", "value": "fr"}, FRENCH, ENGLISH),
    ({"type": "language", "value": "es"}, SPANISH, FRENCH),
    ({"type": "language", "value": "en"}, ENGLISH, SPANISH),
    ({"type": "ends_with_question", "value": None}, "What do you think? 😊", "Is it good? Yes, it is."),
    ({"type": "has_emoji"}, "Have fun 🎉", "Have fun :)"),
    ({"type": "no_emoji"}, "Have fun :)", "Have fun 🎉"),
    ({"type": "contains_at_least", "values": ["Maillard", "amino acid", "reducing sugar"], "value": 2},
     "The Maillard reaction joins an amino acid and a sugar.", "The Maillard reaction browns the meat."),
    ({"type": "min_headings", "value": 2}, HEADED, "# Only one heading\n#hashtag is not one\n    # indented code"),
    ({"type": "max_mean_sentence_words", "value": 12}, FOR_A_CHILD, FOR_AN_ADULT),
    ({"type": "max_long_word_share", "value": 0.1}, FOR_A_CHILD, FOR_AN_ADULT),
]


@pytest.mark.parametrize("spec, passing, failing", CASES, ids=[f"{c[0]['type']}-{i}" for i, c in enumerate(CASES)])
def test_check_passes_and_fails(spec, passing, failing):
    validate_check(spec)
    assert run_check(passing, spec) is True
    assert run_check(failing, spec) is False


def test_every_check_type_is_covered():
    assert {spec["type"] for spec, _, _ in CASES} == set(CHECKS)


def test_case_sensitivity_is_opt_in():
    spec = {"type": "contains_any", "values": ["Paris"], "case_sensitive": True}
    assert run_check("I love Paris.", spec) and not run_check("i love paris.", spec)
    assert run_check("i love paris.", {"type": "contains_any", "values": ["Paris"]})
    assert not run_check("Hey", {"type": "regex", "pattern": "^hey", "case_sensitive": True})


def test_helpers():
    assert words("Don't stop-now, it's 5 o'clock.") == ["Don't", "stop-now", "it's", "5", "o'clock"]
    assert sentences("One. Two!  Three... and four") == ["One", "Two", "Three", "and four"]
    assert bullet_count(LIST_ANSWER) == 3 and bullet_count(NUMBERED_ANSWER) == 2  # '**3.**' is not a bullet
    assert numbered_count(NUMBERED_ANSWER) == 3 and numbered_count("- a\n- b") == 0
    assert numbered_count("Step 1: Boil.\nstep 2: Pour.\n**Step 3:** Wait.\nIn 2024: no") == 3
    assert detect_language("") is None and detect_language("xyz qwv") is None


@pytest.mark.parametrize(
    "word, count",
    [
        ("the", 1), ("she", 1), ("cat", 1), ("make", 1), ("whole", 1), ("times", 1), ("hoped", 1), ("played", 1),
        ("water", 2), ("table", 2), ("people", 2), ("wanted", 2), ("boxes", 2), ("places", 2), ("lonely", 2),
        ("careful", 2), ("movement", 2), ("something", 2), ("sometimes", 2), ("homework", 2), ("don't", 1),
        ("animal", 3), ("element", 3), ("decided", 3), ("beautiful", 3), ("gentleness", 3), ("oxygen", 3),
        ("Café", 2), ("résumé", 3), ("temperature", 4), ("photosynthesis", 5), ("", 0), ("42", 0),
    ],
)
def test_syllables_heuristic(word, count):
    assert syllables(word) == count


def test_readability_measures():
    assert long_word_share("") == 0.0 and mean_sentence_words("") == 0.0
    # Numbers are not words; hyphenated parts are separate words.
    assert long_word_share("In 2024 a step-by-step plan.") == 0.0
    assert long_word_share("Beautiful animals everywhere, cat.") == 0.75
    assert mean_sentence_words("One two three. Four five six seven!") == 3.5
    # A list item or heading without a full stop is a unit of its own.
    assert mean_sentence_words("# Tips\n- drink water\n- sleep well") == 5 / 3
    assert mean_sentence_words(FOR_A_CHILD) < 12 < mean_sentence_words(FOR_AN_ADULT)
    assert long_word_share(FOR_A_CHILD) < 0.1 < long_word_share(FOR_AN_ADULT)


def test_heading_count():
    assert heading_count(HEADED) == 2
    assert heading_count("   ### Three spaces is fine\n####### seven is not\n#no space\n\tnot a tab either") == 1


def test_contains_at_least_counts_distinct_values():
    spec = {"type": "contains_at_least", "values": ["dipole", "magnetron", "GHz"], "value": 2}
    assert not run_check("A dipole, another dipole, a third dipole.", spec)
    assert run_check("The magnetron emits at 2.45 ghz.", spec)
    assert not run_check("The magnetron emits at 2.45 ghz.", {**spec, "case_sensitive": True})


def test_ends_with_question_allows_closing_marks_only():
    spec = {"type": "ends_with_question"}
    for text in ['Ready?', 'Ready?"', "Want more? )", "Shall we? 🚀🙂", "Why?\n"]:
        assert run_check(text, spec), text
    for text in ["", "Ready?.", "Ready? Go", "?!x"]:
        assert not run_check(text, spec), text


def test_satisfied_needs_every_check():
    checks = [{"type": "min_words", "value": 2}, {"type": "has_emoji"}]
    assert satisfied("Great idea 🎉", checks)
    assert not satisfied("Great idea", checks)
    assert not satisfied("🎉", checks)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("max_words", "must be an object with a 'type'"),
        ({"value": 3}, "must be an object with a 'type'"),
        ({"type": "word_count"}, "unknown check type 'word_count'"),
        ({"type": "max_words"}, "'value' must be a number"),
        ({"type": "max_words", "value": "40"}, "'value' must be a number"),
        ({"type": "max_words", "value": True}, "'value' must be a number"),
        ({"type": "contains_any", "values": []}, "'values' must be a non-empty list of strings"),
        ({"type": "not_contains", "values": "coffee"}, "'values' must be a non-empty list of strings"),
        ({"type": "starts_with", "value": ""}, "'value' must be a non-empty string"),
        ({"type": "regex", "pattern": "(unclosed"}, "invalid pattern"),
        ({"type": "language", "value": "klingon"}, "unknown language 'klingon'"),
        ({"type": "contains_at_least", "values": ["a", "b"]}, "'value' must be a positive integer"),
        ({"type": "contains_at_least", "values": ["a", "b"], "value": 0}, "'value' must be a positive integer"),
        ({"type": "contains_at_least", "values": ["a", "b"], "value": 1.5}, "'value' must be a positive integer"),
        ({"type": "contains_at_least", "values": ["a", "b"], "value": 3}, "more than the 2 values"),
        ({"type": "contains_at_least", "values": ["sympathetic", "parasympathetic"], "value": 1}, "count twice"),
        ({"type": "contains_at_least", "values": ["CPI", "cpi"], "value": 1}, "count twice"),
        ({"type": "min_headings", "value": "2"}, "'value' must be a number"),
        ({"type": "max_mean_sentence_words"}, "'value' must be a number"),
        ({"type": "max_long_word_share", "value": 10}, "share between 0 and 1"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(CheckSpecError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate_check(spec)
    with pytest.raises(CheckSpecError):
        run_check("any answer", spec)
