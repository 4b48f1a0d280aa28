"""The quality gate of `pad eval` and `pad data synth`: is an answer still a
good answer, whatever preference it follows?

A preference check alone ("under 50 words", "in French") is passed by a short
or foreign-looking string whatever it says. The gate asks, offline and with
well-kept libraries, what a reader would ask first:

- language:   the answer is in the language the user reads
              (`lingua-language-detector`, over a fixed set of languages);
- real words: nearly all of its words exist in that language
              (`wordfreq`: Zipf frequency >= MIN_ZIPF);
- on topic:   it mentions at least one of the case's topic terms
              (word-start match, case- and accent-insensitive);
- no leakage: no words of PAD's reward template, no role-play transcript
              markers or bracketed template tags, and no echo of five or
              more consecutive words of the preference text;
- not a loop: its repeated word 4-gram share (with and without numbers)
              stays below MAX_REPEATED_4GRAMS, it does not repeat most of its
              lines, and it is not mostly symbols or bare numbers (`is_loop`);
- coherence:  (when scored) its mean per-token log-probability under the base
              model, given the question with the preference as a system
              message, is at least a floor set relative to `prompt` answers
              (`coherence_floor`; a weak signal on a 135M model, see
              COHERENCE_MARGIN).

Pure functions over text (plus the two libraries' data), so every gate is
unit-tested on hand-written good and bad answers. The coherence score itself
needs the model: `pad_core/evaluation/coherence.py`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from pad_core.evaluation.checks import words
from pad_core.evaluation.stats import percentile, repeated_ngram_share

# wordfreq's Zipf scale: log10 of occurrences per billion words. Its large
# lists (en, fr, es, de, it, pt) go down to about 1.0; an invented or
# misspelt word ("choirmasterer", "particulre", "utilissimment") scores 0,
# while rare real words stay well above 1 ("purr" 2.8, "photosynthesis" 3.0,
# "mitochondria" 3.1). So 1.0 separates "exists in the language" from "does
# not" without judging how rare a real word is.
MIN_ZIPF = 1.0
# Share of an answer's words that must be real. Read on the shipped eval's
# answers (results/eval-grid): 190 of 191 English `base`/`prompt` answers
# score >= 0.95 (the one below invents names: "Shawshiron", "Shunl"), and
# every answer read with a share between 0.75 and 0.95 was in an invented
# language ("Para estudar y aprenderte españiles... Verifca que este tipo de
# pasaje es específique", "L'œvêmage / Café aux ils-dorssept").
MIN_REAL_WORD_SHARE = 0.95
# Below this many words a share is too noisy to judge; such answers are
# judged by the other gates (language, topic, coherence).
MIN_WORDS_FOR_SHARE = 4
# A run of this many words copied from the preference is an echo, not an answer.
ECHO_WORDS = 5
# Share of repeated word 4-grams above which an answer is a loop. Read on
# the shipped eval's answers: lists whose items share a stem stay below 0.2
# ("It aids in the proper functioning of the kidneys / ... of the nervous
# system": 0.17), while from about 0.25 up the answer repeats itself
# ("...which you'll find in most homes." four times: 0.27; "Whole Grain Oat
# and Berries / Smoothie with Berries..." alternating: 0.19 and growing).
MAX_REPEATED_4GRAMS = 0.25
# Loops of non-words escape the 4-gram count: "💗 to stay motivated / ### /
# ### / ### / ###.##########" is a loop of lines and of symbols. So an answer
# of at least MIN_LINES_FOR_REPEATS lines is a loop when more than half of
# its lines repeat an earlier line, and any answer is junk when more than
# MAX_SYMBOL_SHARE of its visible characters are symbols other than
# punctuation and emoji (markdown bullets, numbers and emoji stay far below).
MIN_LINES_FOR_REPEATS = 4
MAX_REPEATED_LINES = 0.5
MAX_SYMBOL_SHARE = 0.25
JUNK_SYMBOLS = frozenset("#=~|<>^`\\")
# Numbered loops hide from a word 4-gram count that includes the numbers
# ("5. Report. 6. Report. 7. Report." has no repeated 4-gram), and counting
# is not an answer ("1. 1. 2. 3. 4. 5. ... 23"). So repetition is also
# measured over the letters-only words, and an answer of at least
# MIN_TOKENS_FOR_NUMBERS tokens that are mostly bare numbers is junk.
MIN_TOKENS_FOR_NUMBERS = 8
MAX_NUMBER_SHARE = 0.5
# A list that cycles through a few items on one line escapes both counts
# ("1. Rest. 2. Eat. 3. Drink water. 4. Eat. 5. Sleep. 6. Drink water. ..."
# or "2. 30 min running. 3. 60 min running. ..."): the answer's items (its
# lines and sentences, over letters-only words) are a loop when more than
# half of them repeat an earlier one, the same rule as for lines. Over the
# grid's and the defaults run's 1,300 answers this flags three more, all
# such cycling lists, and no answer a reader would keep.
ITEM_BREAK = re.compile(r"\n+|(?<=[.!?])\s+")
# Coherence floor, relative to the `prompt` answers of the same run: their
# median mean token log-probability minus COHERENCE_MARGIN nats. `prompt`
# answers are the model's own greedy text in exactly the scoring context, so
# they score high (median about -0.7 on the embedded model); good answers
# written by a person score -1.9 to -4.2 under the same 135M model (French
# and Spanish lowest), and the invented-language and off-topic answers this
# gate exists for score -1.8 to -4.1 (tests/data/quality_reference.jsonl).
# The margin is set so that every hand-written good reference answer passes;
# on this model the log-probability cannot tell good from bad beyond that,
# so language, real words, topic and leakage do the real work, and the
# coherence figure is reported per mode for what it is.
COHERENCE_MARGIN = 3.6

LANGUAGES = {  # ISO 639-1 -> lingua's Language name; wide enough to catch invented German/Finnish/...
    "en": "ENGLISH", "fr": "FRENCH", "es": "SPANISH", "de": "GERMAN", "it": "ITALIAN", "pt": "PORTUGUESE",
    "nl": "DUTCH", "sv": "SWEDISH", "da": "DANISH", "fi": "FINNISH", "pl": "POLISH", "ro": "ROMANIAN",
    "ca": "CATALAN", "la": "LATIN", "tr": "TURKISH", "id": "INDONESIAN",
}

TEMPLATE_LEAK = re.compile(
    r"\[\s*(?:guidelines?|principles?|instructions?)\s*\]|\bguidelines?\b|\bprinciples?\b", re.IGNORECASE
)
# "[Insert answer]", "[Prompt] ...", "[Incorrection] ..." at the start of a line (not a markdown link).
BRACKET_TAG = re.compile(r"^\s*\[[A-Za-z][\w ]{1,30}\](?!\()", re.MULTILINE)
# A transcript instead of an answer: "User: ...", "You: ...", "Assistant: ...".
ROLE_MARKER = re.compile(r"^\s*(?:user|you|assistant|ai|system|human|bot)\s*:", re.IGNORECASE | re.MULTILINE)
URL = re.compile(r"https?://\S+|www\.\S+")
LETTERS = re.compile(r"^[^\W\d_]+(?:['’][^\W\d_]+)*$", re.UNICODE)


def _require(module: str):
    """Imports one of the gate's libraries, or says how to get it: they are
    the `eval` extra, which a server does not need."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"the quality gate needs {module!r}: pip install 'pad-server[eval]'") from exc


def fold(text: str) -> str:
    """Lower case without accents: 'Lumière' -> 'lumiere'."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


# --------------------------------------------------------------- components


def word_tokens(text: str) -> list[str]:
    """The alphabetic words of an answer (no numbers, URLs, emoji or
    markdown), hyphenated words split: what a dictionary can judge."""
    out = []
    for word in words(URL.sub(" ", text)):
        for part in re.split(r"[-_]", word):
            part = part.strip("'’")
            if part and LETTERS.match(part):
                out.append(part)
    return out


def real_word_share(text: str, language: str, min_zipf: float = MIN_ZIPF) -> float | None:
    """Share of the answer's words that exist in `language` (None: no words)."""
    zipf_frequency = _require("wordfreq").zipf_frequency
    tokens = word_tokens(text)
    if not tokens:
        return None
    real = sum(is_real_word(token, language, min_zipf, zipf_frequency) for token in tokens)
    return real / len(tokens)


def is_real_word(token: str, language: str, min_zipf: float, zipf_frequency) -> bool:
    if zipf_frequency(token, language) >= min_zipf:
        return True
    # English possessives ("cactus's") are not in the word list as such.
    stem = re.sub(r"['’]s$", "", token)
    return stem != token and zipf_frequency(stem, language) >= min_zipf


def topic_hits(text: str, terms: Sequence[str]) -> list[str]:
    """The topic terms found at the start of a word of the answer."""
    folded = fold(text)
    return [term for term in terms if re.search(r"(?<!\w)" + re.escape(fold(term).strip()), folded)]


def repeat_share(parts: Sequence[str]) -> float:
    """Share of the non-empty parts that repeat an earlier one (0.0 below
    MIN_LINES_FOR_REPEATS parts)."""
    parts = [part for part in parts if part]
    if len(parts) < MIN_LINES_FOR_REPEATS:
        return 0.0
    return 1 - len(set(parts)) / len(parts)


def repeated_line_share(text: str) -> float:
    """Share of the non-empty lines that repeat an earlier line."""
    return repeat_share([line.strip().lower() for line in text.splitlines()])


def repeated_item_share(text: str) -> float:
    """Share of the answer's items (lines and sentences, letters-only words,
    so list numbers and quantities do not count) that repeat an earlier item."""
    return repeat_share([" ".join(word_tokens(part)).lower() for part in ITEM_BREAK.split(text)])


def symbol_share(text: str) -> float:
    """Share of the visible characters that are markup-like symbols ('#',
    '=', '~', '|', '<', '>', '^', '`', '\\') or other symbols below the
    pictograph ranges; markdown emphasis, bullets, currency, arithmetic and
    emoji do not count."""
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return 0.0
    junk = sum(1 for ch in visible if ch in JUNK_SYMBOLS or (unicodedata.category(ch) == "So" and ord(ch) < 0x2190))
    return junk / len(visible)


def number_share(text: str) -> float:
    """Share of the answer's word tokens that are bare numbers (0.0 below
    MIN_TOKENS_FOR_NUMBERS tokens)."""
    tokens = words(text)
    if len(tokens) < MIN_TOKENS_FOR_NUMBERS:
        return 0.0
    return sum(token.isdigit() for token in tokens) / len(tokens)


def letters_repeated_4gram_share(text: str) -> float:
    """repeated_ngram_share over the letters-only words (numbers dropped)."""
    return repeated_ngram_share(" ".join(word_tokens(text)))


def is_loop(text: str, max_repeated_4grams: float = MAX_REPEATED_4GRAMS) -> bool:
    return (
        max(repeated_ngram_share(text), letters_repeated_4gram_share(text)) > max_repeated_4grams
        or max(repeated_line_share(text), repeated_item_share(text)) > MAX_REPEATED_LINES
        or symbol_share(text) > MAX_SYMBOL_SHARE
        or number_share(text) > MAX_NUMBER_SHARE
    )


def echo_of(text: str, preference: str, length: int = ECHO_WORDS) -> str | None:
    """The first run of `length` consecutive preference words repeated in the
    answer, or None."""
    pref = [fold(w) for w in words(preference)]
    answer = " " + " ".join(fold(w) for w in words(text)) + " "
    for start in range(len(pref) - length + 1):
        run = " ".join(pref[start : start + length])
        if f" {run} " in answer:
            return run
    return None


def leaks(text: str, preference: str) -> list[str]:
    """What of the reward prompt or a chat transcript shows in the answer."""
    found = [m.group(0) for m in TEMPLATE_LEAK.finditer(text)]
    found += [m.group(0).strip() for m in BRACKET_TAG.finditer(text)]
    found += [m.group(0).strip() for m in ROLE_MARKER.finditer(text)]
    echo = echo_of(text, preference) if preference else None
    if echo:
        found.append(f"echo: {echo}")
    return found


class LanguageDetector:
    """lingua over LANGUAGES, built once (it loads its models lazily)."""

    @cached_property
    def _detector(self):
        lingua = _require("lingua")
        Language, LanguageDetectorBuilder = lingua.Language, lingua.LanguageDetectorBuilder
        return LanguageDetectorBuilder.from_languages(*(getattr(Language, n) for n in LANGUAGES.values())).build()

    @cached_property
    def _codes(self) -> dict[str, str]:
        return {name: code for code, name in LANGUAGES.items()}

    def detect(self, text: str) -> str | None:
        """ISO 639-1 code of the text's language, None when there are no words."""
        plain = " ".join(word_tokens(text))
        if not plain:
            return None
        language = self._detector.detect_language_of(plain)
        return None if language is None else self._codes[language.name]


# --------------------------------------------------------------------- gate


@dataclass(frozen=True)
class GateResult:
    """Each component: True (pass), False (fail) or None (not judged)."""

    language: bool
    real_words: bool
    on_topic: bool | None
    no_leakage: bool
    not_a_loop: bool
    coherence: bool | None = None
    detected_language: str | None = None
    real_word_share: float | None = None
    topic_hits: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    repeated_4gram_share: float = 0.0
    coherence_logprob: float | None = None

    COMPONENTS = ("language", "real_words", "on_topic", "no_leakage", "not_a_loop", "coherence")

    @property
    def passed(self) -> bool:
        return all(getattr(self, name) is not False for name in self.COMPONENTS)

    @property
    def failures(self) -> list[str]:
        return [name for name in self.COMPONENTS if getattr(self, name) is False]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "failures": self.failures}


class QualityGate:
    """Judges answers; holds the language detector (build once, pass down)."""

    def __init__(self, min_real_word_share: float = MIN_REAL_WORD_SHARE, min_zipf: float = MIN_ZIPF,
                 max_repeated_4grams: float = MAX_REPEATED_4GRAMS):
        self.min_real_word_share = min_real_word_share
        self.min_zipf = min_zipf
        self.max_repeated_4grams = max_repeated_4grams
        self.detector = LanguageDetector()

    def check(self, text: str, *, language: str = "en", topic: Sequence[str] = (), preference: str = "",
              coherence_logprob: float | None = None, coherence_floor: float | None = None) -> GateResult:
        detected = self.detector.detect(text)
        share = real_word_share(text, language, self.min_zipf)
        enough_words = len(word_tokens(text)) >= MIN_WORDS_FOR_SHARE
        hits = topic_hits(text, topic)
        leaked = leaks(text, preference)
        repeated = repeated_ngram_share(text)
        coherent = None
        if coherence_logprob is not None and coherence_floor is not None:
            coherent = coherence_logprob >= coherence_floor
        return GateResult(
            language=detected == language,
            real_words=share is not None and (not enough_words or share >= self.min_real_word_share),
            on_topic=bool(hits) if topic else None,
            no_leakage=not leaked,
            not_a_loop=not is_loop(text, self.max_repeated_4grams),
            coherence=coherent,
            detected_language=detected,
            real_word_share=share,
            topic_hits=hits,
            leaks=leaked,
            repeated_4gram_share=repeated,
            coherence_logprob=coherence_logprob,
        )


def coherence_floor(prompt_logprobs: Sequence[float | None], margin: float = COHERENCE_MARGIN) -> float | None:
    """The coherence floor of a run: the `prompt` answers' median mean token
    log-probability minus `margin` (None when there is nothing to compare with)."""
    values = [v for v in prompt_logprobs if v is not None]
    return percentile(values, 50.0) - margin if values else None
