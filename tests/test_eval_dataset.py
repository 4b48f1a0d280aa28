"""The `pad eval` data set loader: every problem reported with its line
number, all at once; the shipped data set loads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pad_core.evaluation.checks import satisfied
from pad_core.evaluation.dataset import DatasetError, EvalCase, load_cases, parse_cases, select_cases

DEV = Path(__file__).resolve().parents[1] / "data" / "eval" / "dev.jsonl"


def line(**fields) -> str:
    case = {"id": "c1", "prompt": "Hi?", "preference": "be brief", "preference_type": "brevity",
            "checks": [{"type": "max_words", "value": 10}]}
    case.update(fields)
    return json.dumps({k: v for k, v in case.items() if v is not ...})


def test_a_valid_file(tmp_path):
    path = tmp_path / "cases.jsonl"
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello?"}]
    path.write_text(line() + "\n\n" + line(id="c2", prompt=..., messages=messages) + "\n", encoding="utf-8")
    first, second = load_cases(path)
    assert first == EvalCase("c1", [{"role": "user", "content": "Hi?"}], "be brief", "brevity",
                             [{"type": "max_words", "value": 10}], line=1)
    assert second.messages == messages and second.line == 3  # blank line 2 ignored, numbering kept


def test_every_problem_with_its_line_number():
    lines = [
        line(),                                                   # 1 ok
        "{not json",                                              # 2
        line(id="c3", checks=[{"type": "word_count", "value": 3}]),  # 3 unknown check type
        line(id="c1"),                                            # 4 duplicate id
        "[1, 2]",                                                 # 5 not an object
        line(id="c6", prompt=...),                                # 6 neither prompt nor messages
        line(id="c7", messages=[{"role": "user", "content": "x"}]),  # 7 both
        line(id="c8", prompt=..., messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),  # 8
        line(id="c9", preference=""),                             # 9
        line(id="c10", preference_type=...),                      # 10
        line(id="c11", checks=[]),                                # 11
        line(id="c12", check=[{"type": "max_words", "value": 3}]),  # 12 unknown field (typo)
        line(id="c13", checks=[{"type": "max_words", "value": 3}, {"type": "max_words"}]),  # 13 bad argument
        line(id=...),                                             # 14 no id
        line(id="c15", prompt=..., messages=[{"role": "robot", "content": "x"}]),  # 15 bad role
        line(id="ok-16"),                                         # 16 ok
    ]
    with pytest.raises(DatasetError) as info:
        parse_cases(lines, "cases.jsonl")
    problems = info.value.problems
    by_line = {n: msg for n, msg in problems}
    assert set(by_line) == {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
    assert "not valid JSON" in by_line[2]
    assert "checks[0]: unknown check type 'word_count'" in by_line[3]
    assert "duplicate id 'c1' (first on line 1)" in by_line[4]
    assert "JSON object" in by_line[5]
    assert "exactly one of 'messages' or 'prompt'" in by_line[6] and "exactly one" in by_line[7]
    assert "last message must be the user's" in by_line[8]
    assert "'preference' must be a non-empty string" in by_line[9]
    assert "'preference_type'" in by_line[10]
    assert "'checks' must be a non-empty list" in by_line[11]
    assert "unknown field(s) ['check']" in dict(problems)[12]
    assert "checks[1]" in by_line[13]
    assert "'id'" in by_line[14]
    assert "messages[0]" in by_line[15]
    # The message names the file and the line of each problem.
    assert "cases.jsonl:3: checks[0]: unknown check type" in str(info.value)
    assert str(info.value).startswith(f"{len(problems)} problem(s) in cases.jsonl")


def test_a_line_can_have_several_problems():
    with pytest.raises(DatasetError) as info:
        parse_cases([line(preference="", checks=[{"type": "nope"}])])
    assert [n for n, _ in info.value.problems] == [1, 1]


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no cases"):
        load_cases(path)


def test_select_cases_keeps_every_type_under_a_limit():
    cases = parse_cases([line(id=f"{t}{i}", preference_type=t) for t in "ab" for i in range(3)])
    assert [c.id for c in select_cases(cases, limit=1)] == ["a0", "b0"]
    assert [c.id for c in select_cases(cases, types=["b"])] == ["b0", "b1", "b2"]
    assert [c.id for c in select_cases(cases, ids=["a2", "b1"])] == ["a2", "b1"]


def test_the_shipped_data_set():
    cases = load_cases(DEV)
    assert len(cases) >= 60
    types = Counter(c.preference_type for c in cases)
    assert len(types) >= 8 and min(types.values()) >= 6, types
    assert len({c.messages[-1]["content"] for c in cases}) == len(cases), "prompts vary"
    # No check is trivially satisfied by an empty answer, and the license is stated.
    assert not any(satisfied("", c.checks) for c in cases)
    assert "CC0" in (DEV.parent / "README.md").read_text(encoding="utf-8")


def test_the_shipped_checks_can_be_met():
    """For each type, a hand-written answer that follows the preference passes
    and a plain English paragraph fails: the checks are reachable and fair."""
    plain = ("Getting better at this takes practice. Start small, be patient with yourself, and keep a routine "
             "that works for you. Over time, the results will come, and you will enjoy the process much more. Remember "
             "that everyone starts somewhere, so celebrate the small wins along the way and keep going.")
    plain = plain + " " + plain  # long enough to break the brevity limit
    good = {
        "brevity": "Practice a little every day and be patient.",
        "bullets": "- Practice daily\n- Be patient\n- Keep a routine",
        "numbered_steps": "1. Start small.\n2. Practice daily.\n3. Review your progress.",
        "humour": "Practice daily - and no, buying more gear is not practice, I'm kidding!",
        "question_ending": "Practice daily and be patient. What have you tried so far?",
        "french": "Il faut pratiquer tous les jours et être patient avec vous-même pour progresser.",
        "spanish": "Es importante practicar todos los días y ser paciente con uno mismo para mejorar.",
        "avoid_word": "Practice every day, be patient, and keep a simple routine.",
        "emoji": "Practice daily and be patient 💪",
        "casual_tone": "Hey! Just practice a bit every day and be patient.",
    }
    for case in load_cases(DEV):
        assert not satisfied(plain, case.checks) or case.preference_type == "avoid_word", case.id
        assert satisfied(good[case.preference_type], case.checks), case.id
