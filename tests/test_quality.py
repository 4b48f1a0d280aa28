"""The quality gate (pad_core/evaluation/quality.py) on hand-written good and
bad answers: the bad ones are the answers issue 12 quotes from PAD at
degenerate settings (tests/data/quality_reference.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pad_core.evaluation.quality import (
    COHERENCE_MARGIN,
    GateResult,
    QualityGate,
    coherence_floor,
    echo_of,
    fold,
    is_loop,
    leaks,
    real_word_share,
    topic_hits,
    word_tokens,
)

REFERENCE = Path(__file__).parent / "data" / "quality_reference.jsonl"
ROWS = [json.loads(line) for line in REFERENCE.read_text(encoding="utf-8").splitlines() if line.strip()]
GOOD = [r for r in ROWS if r["kind"] == "good"]
BAD = [r for r in ROWS if r["kind"] == "bad"]


@pytest.fixture(scope="module")
def gate() -> QualityGate:
    return QualityGate()


def judge(gate: QualityGate, row: dict, **extra) -> GateResult:
    return gate.check(row["answer"], language=row["language"], topic=row["topic"], preference=row["preference"], **extra)


@pytest.mark.parametrize("row", GOOD, ids=[r["prompt"][:30] for r in GOOD])
def test_good_answers_pass_every_gate(gate, row):
    result = judge(gate, row)
    assert result.passed, result.to_dict()
    assert result.topic_hits and not result.leaks


@pytest.mark.parametrize("row", BAD, ids=[r["answer"][:30] for r in BAD])
def test_bad_answers_fail_the_gates_that_name_their_fault(gate, row):
    result = judge(gate, row)
    assert not result.passed
    assert set(row["fails"]) <= set(result.failures), result.to_dict()


def test_gate_passes_on_unjudged_components_and_fails_on_any_false():
    ok = GateResult(language=True, real_words=True, on_topic=None, no_leakage=True, not_a_loop=True, coherence=None)
    assert ok.passed and ok.failures == []
    bad = GateResult(language=True, real_words=True, on_topic=True, no_leakage=True, not_a_loop=True, coherence=False)
    assert not bad.passed and bad.failures == ["coherence"]
    assert bad.to_dict()["failures"] == ["coherence"]


# ---- components ------------------------------------------------------------------


def test_fold_drops_case_and_accents():
    assert fold("Lumière ÉTÉ Mañana") == "lumiere ete manana"


def test_topic_terms_match_at_word_starts_case_and_accent_insensitively():
    text = "La lumière du Soleil se diffuse; Scattering explains it. Blood pressure rises."
    assert topic_hits(text, ["lumiere", "diffus", "scatter", "blood pressure", "soleil"]) == [
        "lumiere", "diffus", "scatter", "blood pressure", "soleil"
    ]
    # Not inside a word: "eau" is not in "beaucoup", "sun" not in "unsung".
    assert topic_hits("beaucoup de choses unsung", ["eau", "sun"]) == []


def test_echo_needs_five_consecutive_preference_words():
    preference = "I like short answers with a bit of humour"
    assert echo_of("Sure! You like short answers with a bit of fun.", preference) == "like short answers with a"
    assert echo_of("Short answers, with humour: sleep more.", preference) is None


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("[Guidelines] be brief", "[Guidelines]"),
        ("Following the principles above, sleep.", "principles"),
        ("[Prompt] Make it fun", "[Prompt]"),
        ("Sure.\nUser: and then?", "User:"),
        ("[Instruction] Answer", "[Instruction]"),
    ],
)
def test_leaks_name_template_words_tags_and_transcripts(text, leak):
    assert leak in leaks(text, "")


@pytest.mark.parametrize(
    "text",
    [
        "Boilé en leçon:\n\n" * 10,  # repeated 4-grams
        "💗 to stay motivated to exercise\n###\n###\n###\n###\n###.##########################",  # lines, symbols
        "Step one.\nStep two.\nStep two.\nStep two.\nStep two.",  # repeated lines
        # numbered loops: the numbers hide the repetition from a plain 4-gram count
        "1. Find a bird watching location. 2. Carry binoculars. 3. Observe. 4. Report. 5. Report. 6. Report. "
        "7. Report. 8. Report. 9. Report. 10. Report. 11. Report. 12. Report.",
        "1. Energy can be reduced by using renewable energy. 2. 1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14.",  # counting
        # lists cycling through a few items on one line (read in a PersRM run, counted good before)
        "1. Rest. 2. Eat healthy. 3. Drink water. 4. Eat. 5. Exercise. 6. Sleep. 7. Eat. 8. Drink water. 9. Eat. "
        "10. Drink water. 11. Sleep. 12. Exercise. 13. Drink water. 14. Eat. 15. Drink water. 16. Sleep. 17.",
        "Sure, here are some steps you can do to start running:\n\n1. Begin with the basics: 200m running.\n"
        "2. 30 min running.\n3. 60 min running.\n4. 90 min running.\n5. 180 min running.\n6. 200 m running.\n"
        "7. 40 min running.\n8. 80 min running.\n9.",
    ],
)
def test_loops_of_words_lines_and_symbols(text):
    assert is_loop(text)


@pytest.mark.parametrize(
    "text",
    [
        "- one idea\n- two ideas\n- three ideas\n- four ideas",
        "1. **Preheat** the oven\n2. **Mix** flour and water\n3. *Knead* the dough\n4. Bake it",
        "It costs $5 + $3 = $8, about 10% off.",
        "## Sleep\nGo to bed at the same time every night.",
        "1. Preheat the oven to 220 C.\n2. Mix 500 g flour, 7 g yeast, 10 g salt and 325 ml water.\n"
        "3. Knead for 10 minutes.\n4. Let it rise for 1 hour.\n5. Bake for 25 minutes.",
        "1. Drinking water helps to maintain proper bodily functions\n2. It aids in the elimination of waste "
        "products\n3. It aids in the proper functioning of the kidneys\n4. It aids in the proper functioning of "
        "the nervous system",
        # items that share words but not all of them; a refrain said twice
        "Mix 2 cups flour. Add 1 cup sugar. Add 2 eggs. Stir well. Bake 30 minutes. Stir well.",
        "- Drink water in the morning.\n- Drink water with every meal.\n- Drink water after exercise.\n"
        "- Carry a bottle.",
    ],
)
def test_lists_markdown_and_arithmetic_are_not_loops(text):
    assert not is_loop(text)


def test_markdown_links_and_ordinary_text_do_not_leak():
    assert leaks("See [the NHS page](https://nhs.uk) for more. You can sleep.", "short answers") == []


def test_word_tokens_skip_numbers_urls_and_emoji_and_split_hyphens():
    assert word_tokens("Drink 2 litres 💧 of water-based drinks, see https://x.org/a-b ok") == [
        "Drink", "litres", "of", "water", "based", "drinks", "see", "ok"
    ]


def test_real_word_share_counts_dictionary_words_of_the_expected_language():
    assert real_word_share("The cat's whiskers sense tiny movements.", "en") == 1.0
    assert real_word_share("Le chat dort sur le canapé.", "fr") == 1.0
    invented = real_word_share("Verifca que este pasaje es específique para tu especíbel.", "es")
    assert invented is not None and invented < 0.8
    assert real_word_share("🌞 42 🌈", "en") is None


def test_short_answers_are_not_judged_on_their_word_share(gate):
    result = gate.check("Sleep more, Shawshiron.", language="en", topic=["sleep"])
    assert result.real_words and result.passed


def test_wrong_language_fails_even_with_real_words(gate):
    answer = "Il faut dormir huit heures chaque nuit et éviter les écrans le soir."
    result = gate.check(answer, language="en", topic=["dormir"])
    assert result.detected_language == "fr" and not result.language
    assert gate.check(answer, language="fr", topic=["dormir"]).passed


def test_coherence_floor_is_relative_to_the_prompt_median():
    assert coherence_floor([-0.5, -0.7, -0.9, None]) == pytest.approx(-0.7 - COHERENCE_MARGIN)
    assert coherence_floor([]) is None and coherence_floor([None]) is None


def test_coherence_joins_the_gate_only_when_scored(gate):
    row = GOOD[0]
    assert judge(gate, row).coherence is None
    assert judge(gate, row, coherence_logprob=-2.0, coherence_floor=-4.0).coherence is True
    assert not judge(gate, row, coherence_logprob=-5.0, coherence_floor=-4.0).passed


# ---- the coherence margin on the real model -------------------------------------


@pytest.mark.integration
def test_coherence_margin_passes_every_good_reference_answer():
    """The margin's justification, re-measured: the embedded model's own greedy
    answers (what `prompt` mode gives) set the floor, and every hand-written
    good reference answer clears it."""
    from pad_core.evaluation.coherence import CoherenceScorer, ScoringItem
    from pad_core.model_loading import load_engine
    from pad_core.settings import EngineSettings
    from pad_core.types import ChatRequest, SamplingParams
    from server.tools.eval import prompt_messages

    contexts = [prompt_messages([{"role": "user", "content": r["prompt"]}], r["preference"]) for r in GOOD]
    engine = load_engine(EngineSettings(dtype="float32"))
    texts: dict[str, str] = {}
    requests = [ChatRequest(str(i), c, sampling=SamplingParams(temperature=0.0, max_tokens=48))
                for i, c in enumerate(contexts)]
    for output in engine.generate(requests):
        texts[output.request_id] = texts.get(output.request_id, "") + output.text
    scorer = CoherenceScorer(engine.runners["base"].model, engine.tokenizer)

    def items(answers):
        return [ScoringItem(tuple((m["role"], m["content"]) for m in c), a) for c, a in zip(contexts, answers)]

    greedy = scorer.score(items([texts[str(i)] for i in range(len(GOOD))]))
    floor = coherence_floor(greedy)
    good = scorer.score(items([r["answer"] for r in GOOD]))
    assert all(score >= floor for score in good), (floor, good)
    assert all(score >= floor for score in greedy)
