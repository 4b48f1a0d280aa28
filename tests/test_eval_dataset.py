"""The `pad eval` data set loader: every problem reported with its line
number, all at once; the shipped data set loads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pad_core.evaluation.checks import satisfied
from pad_core.evaluation.dataset import (
    LANGUAGES,
    DatasetError,
    EvalCase,
    load_cases,
    parse_cases,
    select_cases,
    split_of,
)

DATA = Path(__file__).resolve().parents[1] / "data"
DEV = DATA / "eval" / "dev.jsonl"
SYNTH = DATA / "train" / "synth_cases.jsonl"
NEW_TYPES = {"formal_tone", "expert_level", "child_audience", "tldr_first", "headings", "enthusiastic_tone"}


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


def test_language_and_topic(tmp_path):
    first, second = parse_cases([line(), line(id="c2", language="fr", topic=["ciel", "lumière bleue"])])
    assert (first.language, first.topic) == ("en", ())  # the defaults
    assert (second.language, second.topic) == ("fr", ("ciel", "lumière bleue"))


def test_a_case_built_positionally_still_works():
    case = EvalCase("c1", [{"role": "user", "content": "Hi?"}], "be brief", "brevity", [], 3, "a note")
    assert (case.line, case.notes, case.language, case.topic) == (3, "a note", "en", ())


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"language": "english"}, "'language' must be one of en, fr, es, de, it, pt (ISO 639-1), not 'english'"),
        ({"language": "FR"}, "'language' must be one of en, fr, es, de, it, pt (ISO 639-1), not 'FR'"),
        ({"language": None}, "'language' must be one of"),
        ({"topic": []}, "'topic' must be a non-empty list of non-empty strings"),
        ({"topic": "sky"}, "'topic' must be a non-empty list"),
        ({"topic": ["sky", " "]}, "'topic' must be a non-empty list"),
        ({"topic": ["sky", 3]}, "'topic' must be a non-empty list"),
        ({"topic": None}, "'topic' must be a non-empty list"),
    ],
)
def test_bad_language_or_topic(fields, message):
    with pytest.raises(DatasetError) as info:
        parse_cases([line(), line(id="c2", **fields)], "cases.jsonl")
    assert [n for n, _ in info.value.problems] == [2]
    assert f"cases.jsonl:2: {message}" in str(info.value)


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


def test_split_halves_each_type_in_file_order():
    cases = parse_cases([line(id=f"{t}{i}", preference_type=t) for t in "ab" for i in range(3)]
                        + [line(id="c0", preference_type="c")])
    # ceil(3/2) = 2 of each 3 tune; a lone case tunes.
    assert split_of(cases) == {"a0": "tune", "a1": "tune", "a2": "heldout", "b0": "tune", "b1": "tune",
                               "b2": "heldout", "c0": "tune"}
    assert [c.id for c in select_cases(cases, split="tune")] == ["a0", "a1", "b0", "b1", "c0"]
    assert [c.id for c in select_cases(cases, split="heldout")] == ["a2", "b2"]
    assert select_cases(cases, split="all") == select_cases(cases) == cases
    # The limit applies after the split, per type; filters do not move a case to another split.
    assert [c.id for c in select_cases(cases, split="tune", limit=1)] == ["a0", "b0", "c0"]
    assert [c.id for c in select_cases(cases, split="heldout", types=["b"])] == ["b2"]
    assert [c.id for c in select_cases(cases, split="tune", ids=["a1", "a2"])] == ["a1"]
    with pytest.raises(ValueError, match="unknown split 'test'"):
        select_cases(cases, split="test")


def test_the_shipped_data_set():
    cases = load_cases(DEV)
    assert len(cases) >= 120
    types = Counter(c.preference_type for c in cases)
    assert len(types) >= 16 and min(types.values()) >= 8 and NEW_TYPES <= set(types), types
    assert len({c.messages[-1]["content"] for c in cases}) == len(cases), "prompts vary"
    # No check is trivially satisfied by an empty answer, and the license is stated.
    assert not any(satisfied("", c.checks) for c in cases)
    assert "CC0" in (DEV.parent / "README.md").read_text(encoding="utf-8")
    # Every case says what a good answer is about, in the language the preference asks for.
    expected = {"french": "fr", "spanish": "es"}
    for case in cases:
        assert case.language == expected.get(case.preference_type, "en"), case.id
        assert 6 <= len(case.topic) <= 20 and len({t.lower() for t in case.topic}) == len(case.topic), case.id
    # An avoid-word answer cannot use the banned word, so no topic term may contain it.
    for case in (c for c in cases if c.preference_type == "avoid_word"):
        banned = case.checks[0]["values"][0].lower()
        assert not any(banned in t.lower() for t in case.topic), case.id
    # Half of each type tunes the settings, the other half is held out.
    splits = Counter((c.preference_type, s) for c, s in zip(cases, split_of(cases).values()))
    assert set(splits.values()) == {4}, splits


def test_the_training_cases_are_valid_and_disjoint_from_the_eval_set():
    """data/train/synth_cases.jsonl (data/train/build_cases.py) loads, has a
    language and a topic everywhere, and shares no question with dev.jsonl."""
    train = load_cases(SYNTH)
    eval_prompts = {c.messages[-1]["content"].lower() for c in load_cases(DEV)}
    assert not {c.messages[-1]["content"].lower() for c in train} & eval_prompts
    assert all(c.topic and c.language in LANGUAGES for c in train)
    assert all(c.language == "fr" for c in train if c.preference_type == "french")
    types = Counter(c.preference_type for c in train)
    assert NEW_TYPES <= set(types) and len(set(types.values())) == 1, types
    assert not {"spanish", "avoid_word", "casual_tone"} & set(types)  # unseen in training


# Per-case answers where the checks depend on the question (the expert's terms).
EXPERT_ANSWERS = {
    "expert-01": "The magnetron emits microwaves at about 2.45 GHz into the cavity. The oscillating field makes the "
                 "water dipoles rotate; dielectric loss turns that motion into heat throughout the food.",
    "expert-02": "Searing drives the Maillard reaction: amino acids condense with reducing sugars above roughly "
                 "140 C, forming melanoidins and flavour compounds such as pyrazines on the dry surface.",
    "expert-03": "Exercise raises sympathetic drive and circulating epinephrine, which act on the sinoatrial node, "
                 "so heart rate and stroke volume rise and cardiac output meets the metabolic demand of muscle.",
    "expert-04": "Your nominal balance grows at the deposit rate, but the real return is that rate minus inflation "
                 "(the Fisher relation), so when CPI inflation exceeds it you lose purchasing power.",
    "expert-05": "When the working sets of all processes exceed physical memory, the OS starts paging to the swap "
                 "file; page faults and context switches pile up, and in the worst case the system is thrashing.",
    "expert-06": "Pathogens trigger macrophages to release cytokines such as interleukin-1, endogenous pyrogens "
                 "that induce prostaglandin E2 in the hypothalamus, which raises the thermoregulatory set point; "
                 "the body then conserves heat until the core reaches it.",
    "expert-07": "A minor triad has a minor third above the root, a semitone lower than the major third; its "
                 "frequency ratios (6:5) are less simple, and we learn to associate that colour with sadness.",
    "expert-08": "The pedal pushes the master cylinder; incompressible brake fluid carries the pressure (Pascal's "
                 "law) to the caliper pistons, which clamp the pads on the rotor and friction turns kinetic energy "
                 "into heat.",
}


# For a six-year-old, one per question: the readability limits leave room for the words each question needs.
CHILD_ANSWERS = {
    "child-01": (
        "Rain comes from clouds. The sun warms water in lakes and seas. The water turns into tiny drops that "
        "float up into the sky. Up high it is cold, so the drops stick together and make clouds. When the "
        "drops get too big and heavy, they fall down. That is rain!"
    ),
    "child-02": (
        "The sun does not go anywhere! Our Earth is like a big spinning ball. It turns all the way around "
        "each day. When our side of the Earth faces the sun, it is day. When our side turns away, it is "
        "night. Then kids on the other side of the world see the sun."
    ),
    "child-03": (
        "Bees fly from flower to flower. They drink a sweet juice called nectar. They carry it home to the "
        "hive in their tummies. Then they pass it from bee to bee and fan it with their wings. The water "
        "dries up and the nectar gets thick. Now it is honey!"
    ),
    "child-04": (
        "Fish breathe with gills, not lungs like us. Water has a little bit of air in it, called oxygen. A "
        "fish gulps water with its mouth. The water goes over the gills on the sides of its head. The gills "
        "grab the oxygen, and the water goes back out. So fish can breathe under the water!"
    ),
    "child-05": (
        "A rainbow needs sun and rain at the same time. Sunlight looks white, but it is really made of many "
        "colors mixed up. When the light goes into a raindrop, it bends. The colors split apart. Then you see"
        " red, orange, yellow, green, blue and purple in a big arc in the sky!"
    ),
    "child-06": (
        "Dogs wag their tails to show how they feel. A big, happy wag means your dog is glad to see you. A "
        "slow wag can mean the dog is not sure. A tail tucked down low means the dog is scared. So a tail is "
        "like a way for dogs to talk to us!"
    ),
    "child-07": (
        "Stars are giant balls of very hot gas. They are so hot that they glow and give off light. Our sun is"
        " a star too! The other stars look tiny because they are very, very far away. Most of the gas in a "
        "star is called hydrogen."
    ),
    "child-08": (
        "Birds fly with their wings. They flap them up and down to push on the air. Their feathers are light,"
        " and their bones are thin and hollow, so they do not weigh much. When a bird spreads its wings wide,"
        " the air holds it up. Then it can glide, like a paper plane!"
    ),
}


def test_the_shipped_checks_can_be_met():
    """For each type, a hand-written answer that follows the preference passes
    and one that does not (a plain English paragraph, unless given) fails:
    the checks are reachable and fair."""
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
        "formal_tone": "Practice regularly and be patient with yourself. It is advisable to keep a routine and to "
                       "review your progress each week; do not expect results immediately.",
        "tldr_first": "**TL;DR:** practise a little every day.\n\nStart small, keep a routine that works for you, "
                      "and be patient with yourself while you improve.",
        "headings": "## Start small\nPick one simple goal and practise it for ten minutes a day.\n\n"
                    "## Keep going\nTrack your progress every week, be patient with yourself, and celebrate the "
                    "small wins along the way.",
        "enthusiastic_tone": "Oh, this is going to be so much fun! Start small, practise a little every day, and "
                             "celebrate every single win along the way!",
    }
    bad = {
        "avoid_word": None,  # a plain answer may well avoid the word
        "formal_tone": "Hey! Don't worry, it's gonna be fine: just practise a bit every day and you'll get there.",
        "child_audience": ("Improvement depends on deliberate practice: identify a specific, measurable objective, "
                           "practise consistently, and evaluate your progress systematically using reliable "
                           "feedback from experienced practitioners."),
        "expert_level": ("It mostly comes down to a simple idea that is easy to picture, and once you see it the "
                         "whole thing makes sense, so there is nothing complicated to worry about here."),
    }
    for case in load_cases(DEV):
        failing = bad.get(case.preference_type, plain)
        assert failing is None or not satisfied(failing, case.checks), case.id
        passing = {**EXPERT_ANSWERS, **CHILD_ANSWERS}.get(case.id) or good[case.preference_type]
        assert satisfied(passing, case.checks), case.id
