"""Automatic, verifiable checks of an answer (`pad eval`, `pad data synth`).

A check is a JSON object with a `type` and its arguments, e.g.
{"type": "max_words", "value": 40}. Each type maps to a pure function
(answer text, spec) -> bool. Unknown types and bad arguments raise
CheckSpecError, so a data set is validated before anything runs.

The readability checks (max_mean_sentence_words, max_long_word_share: is
this simple enough for a child?) count English syllables with a documented
heuristic (`syllables`), good enough for a share over a whole answer.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

WORD = re.compile(r"\b[\w'’-]+\b", re.UNICODE)
BULLET = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+\S", re.MULTILINE)
# A numbered item: "1. ", "2) ", "**3.** ", "Step 4: " at the start of a line.
NUMBERED = re.compile(r"^\s*(?:\*\*)?(?:step\s+)?\d+[.):](?:\*\*)?\s+\S", re.MULTILINE | re.IGNORECASE)
# A closing question: '?' followed only by closing quotes/brackets, emoji or spaces.
ENDS_WITH_QUESTION = re.compile(r"\?[\s\"'”’»)\]*_\U0001f000-\U0001faff\U00002600-\U000027bf]*$")
SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)")
EMOJI = re.compile(
    "[\U0001f300-\U0001faff\U00002600-\U000027bf\U0001f000-\U0001f2ff\U0001f900-\U0001f9ff]", re.UNICODE
)
# A Markdown ATX heading: up to 3 spaces, 1 to 6 '#', a space, then text.
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+\S", re.MULTILINE)
# Words for readability: runs of letters (apostrophes inside allowed), so
# numbers are not words and "step-by-step" is three short words, not one long one.
LETTER_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
VOWEL_GROUP = re.compile(r"[aeiouy]+")
# A silent 'e' ending a stem (the syllable heuristic below): at the end
# (make, whole), before a consonant suffix (lonely, careful, homeless,
# lateness, movement), before -d (hoped, played) or -s (times). Pronounced:
# consonant + '-le' (table, gentleness), '-ement' (element), '-ed' after t/d
# (wanted), '-es' after a sibilant (boxes, places, pages).
SILENT_E = re.compile(
    r"(?<=[^aeiouy])(?<![^aeiouy]l)e(?=(?:ly|ful|less|ness)?$)"
    r"|(?<=[^aeiouyl])e(?=ment$)"
    r"|(?<=[^aeioutd])e(?=d$)"
    r"|(?<=[^aeiouycgsxzh])e(?=s$)"
)
# Compounds whose first part ends in a silent 'e' (something, sometimes,
# homework, lifetime): the heuristic above only sees the end of a word.
SILENT_E_PREFIX = re.compile(
    r"^(?:som|hom|tim|lif|fir|car|sid|lik|lov|nam|plac|spac|gam|saf|us|whol)e(?=[^aeiouy][a-z])"
)

# Frequent function words, enough to tell these languages apart by counts.
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the and is are of to in that it for you with on this be as not your can have".split()),
    "fr": frozenset("le la les et est des un une du en que qui pour pas vous dans sur avec au ce sont".split()),
    "es": frozenset("el la los las y es de un una que en para por con no se su al lo como".split()),
    "de": frozenset("der die das und ist nicht ein eine zu den mit sie es auf für von dem sich auch".split()),
    "it": frozenset("il lo la gli le e è di un una che per non con del della sono si come anche".split()),
    "pt": frozenset("o a os as e é de um uma que para não com do da em se por como mais".split()),
}


class CheckSpecError(ValueError):
    """A check that cannot be evaluated as written."""


def words(text: str) -> list[str]:
    return WORD.findall(text)


def sentences(text: str) -> list[str]:
    parts = [p.strip() for p in SENTENCE_END.split(text)]
    return [p for p in parts if WORD.search(p)]


def bullet_count(text: str) -> int:
    return len(BULLET.findall(text))


def numbered_count(text: str) -> int:
    return len(NUMBERED.findall(text))


def heading_count(text: str) -> int:
    return len(HEADING.findall(text))


def syllables(word: str) -> int:
    """English syllables, estimated: vowel groups (y counts as a vowel), less
    one silent 'e' at the end of the word (SILENT_E) or of a compound's first
    part (SILENT_E_PREFIX), at least 1. Right for most everyday words and off
    by one on some (maybe: 1, cement: 1); a share of long words over a whole
    answer averages such errors out, which is all the readability checks need."""
    # An accented final 'é' is spoken (café, résumé): keep it a vowel group of its own.
    word = unicodedata.normalize("NFKD", word.lower().replace("é", "ey")).encode("ascii", "ignore").decode()
    word = SILENT_E_PREFIX.sub(lambda m: m.group(0)[:-1], re.sub(r"[^a-z]", "", word))
    if not word:
        return 0
    silent = 1 if SILENT_E.search(word) else 0
    return max(1, len(VOWEL_GROUP.findall(word)) - silent)


def long_word_share(text: str) -> float:
    """The share of words with 3 or more syllables (0.0 without words): the
    polysyllable count of readability formulas (SMOG, Gunning fog)."""
    found = LETTER_WORD.findall(text)
    return sum(syllables(w) >= 3 for w in found) / len(found) if found else 0.0


def mean_sentence_words(text: str) -> float:
    """Words per sentence (0.0 without words). Each line is split on its own,
    so a list item or a heading without a full stop is one short unit rather
    than part of one endless sentence."""
    units = [s for line in text.splitlines() for s in sentences(line)]
    return sum(len(words(u)) for u in units) / len(units) if units else 0.0


def detect_language(text: str) -> str | None:
    """The language whose stop words occur most often (None if no evidence)."""
    tokens = [w.lower() for w in words(text)]
    counts = {lang: sum(t in vocab for t in tokens) for lang, vocab in STOP_WORDS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def _number(spec: dict[str, Any], key: str = "value") -> float:
    value = spec.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise CheckSpecError(f"{spec.get('type')}: '{key}' must be a number")
    return value


def _string(spec: dict[str, Any], key: str = "value") -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise CheckSpecError(f"{spec.get('type')}: '{key}' must be a non-empty string")
    return value


def _strings(spec: dict[str, Any], key: str = "values") -> list[str]:
    values = spec.get(key)
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise CheckSpecError(f"{spec.get('type')}: '{key}' must be a non-empty list of strings")
    return values


def _count(spec: dict[str, Any], key: str = "value") -> int:
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckSpecError(f"{spec.get('type')}: '{key}' must be a positive integer")
    return value


def _share(spec: dict[str, Any], key: str = "value") -> float:
    value = _number(spec, key)
    if not 0 <= value <= 1:
        raise CheckSpecError(f"{spec.get('type')}: '{key}' must be a share between 0 and 1")
    return value


def _fold(text: str, spec: dict[str, Any]) -> str:
    return text if spec.get("case_sensitive") else text.lower()


def _contains(text: str, needle: str, spec: dict[str, Any]) -> bool:
    return _fold(needle, spec) in _fold(text, spec)


def _contains_at_least(text: str, spec: dict[str, Any]) -> bool:
    """At least `value` of the distinct `values` occur (substrings, like
    contains_any). One mention must not count twice, so no value may contain
    another, and `value` cannot exceed the number of values (unreachable)."""
    values, needed = _strings(spec), _count(spec)
    folded = [_fold(v, spec) for v in values]
    nested = [(a, b) for a in values for b, fb in zip(values, folded) if a != b and _fold(a, spec) in fb]
    if nested:
        inner, outer = nested[0]
        raise CheckSpecError(f"contains_at_least: {inner!r} is inside {outer!r}; one mention would count twice")
    if len(set(folded)) < len(folded):
        raise CheckSpecError("contains_at_least: 'values' has duplicates")
    if needed > len(values):
        raise CheckSpecError(f"contains_at_least: 'value' ({needed}) is more than the {len(values)} values")
    return sum(_contains(text, v, spec) for v in values) >= needed


def _regex(spec: dict[str, Any]) -> re.Pattern:
    try:
        return re.compile(_string(spec, "pattern"), 0 if spec.get("case_sensitive") else re.IGNORECASE)
    except re.error as exc:
        raise CheckSpecError(f"regex: invalid pattern: {exc}") from exc


def _language(spec: dict[str, Any]) -> str:
    lang = _string(spec)
    if lang not in STOP_WORDS:
        raise CheckSpecError(f"language: unknown language {lang!r}; known: {', '.join(STOP_WORDS)}")
    return lang


CHECKS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "max_words": lambda text, spec: len(words(text)) <= _number(spec),
    "min_words": lambda text, spec: len(words(text)) >= _number(spec),
    "max_sentences": lambda text, spec: len(sentences(text)) <= _number(spec),
    "min_sentences": lambda text, spec: len(sentences(text)) >= _number(spec),
    "min_bullets": lambda text, spec: bullet_count(text) >= _number(spec),
    "max_bullets": lambda text, spec: bullet_count(text) <= _number(spec),
    "contains_any": lambda text, spec: any(_contains(text, v, spec) for v in _strings(spec)),
    "contains_all": lambda text, spec: all(_contains(text, v, spec) for v in _strings(spec)),
    "not_contains": lambda text, spec: not any(_contains(text, v, spec) for v in _strings(spec)),
    "starts_with": lambda text, spec: _fold(text.strip(), spec).startswith(_fold(_string(spec), spec)),
    "ends_with": lambda text, spec: _fold(text.strip(), spec).endswith(_fold(_string(spec), spec)),
    "regex": lambda text, spec: _regex(spec).search(text) is not None,
    "not_regex": lambda text, spec: _regex(spec).search(text) is None,
    "language": lambda text, spec: detect_language(text) == _language(spec),
    "min_numbered": lambda text, spec: numbered_count(text) >= _number(spec),
    "ends_with_question": lambda text, spec: ENDS_WITH_QUESTION.search(text.strip()) is not None,
    "has_emoji": lambda text, spec: EMOJI.search(text) is not None,
    "no_emoji": lambda text, spec: EMOJI.search(text) is None,
    "contains_at_least": _contains_at_least,
    "min_headings": lambda text, spec: heading_count(text) >= _number(spec),
    "max_mean_sentence_words": lambda text, spec: mean_sentence_words(text) <= _number(spec),
    "max_long_word_share": lambda text, spec: long_word_share(text) <= _share(spec),
}


def validate_check(spec: Any) -> None:
    """Raises CheckSpecError unless `spec` is a well-formed check."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise CheckSpecError("a check must be an object with a 'type'")
    if spec["type"] not in CHECKS:
        raise CheckSpecError(f"unknown check type {spec['type']!r}; known: {', '.join(sorted(CHECKS))}")
    CHECKS[spec["type"]]("", spec)  # evaluates the arguments' validation


def run_check(text: str, spec: dict[str, Any]) -> bool:
    validate_check(spec)
    return CHECKS[spec["type"]](text, spec)


def satisfied(text: str, checks: list[dict[str, Any]]) -> bool:
    """An answer satisfies a preference when it passes all of its checks."""
    return all(run_check(text, spec) for spec in checks)
