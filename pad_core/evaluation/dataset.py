"""The `pad eval` data set: JSONL, one case per line.

    {"id": "fr-01", "prompt": "How do I boil an egg?",
     "preference": "Always answer in French.", "preference_type": "french",
     "checks": [{"type": "language", "value": "fr"}]}

`messages` (a chat: [{"role", "content"}], ending with a user turn) may be
given instead of `prompt`. An answer satisfies the preference when it passes
every check.

Two optional fields describe what a good answer is, apart from the
preference (the quality gate of `pad eval` reads them):

- `language`: the ISO 639-1 code of the language the answer must be in, one
  of checks.STOP_WORDS' (en, fr, es, de, it, pt); "en" when absent.
- `topic`: topic terms in that language; an answer is on topic when one of
  them occurs in it (case- and accent-insensitive, at the start of a word,
  so a stem like "scatter" matches "scattering").

A file is validated as a whole before anything runs: every
malformed line, missing or mistyped field, duplicate id and bad check is
reported with its line number in one DatasetError; nothing is skipped
silently (blank lines are the only lines ignored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pad_core.evaluation.checks import STOP_WORDS, CheckSpecError, validate_check

ROLES = frozenset({"system", "user", "assistant"})
FIELDS = frozenset(
    {"id", "messages", "prompt", "preference", "preference_type", "checks", "notes", "language", "topic"}
)
# Languages an answer can be required to be in: those the checks can detect.
LANGUAGES = tuple(STOP_WORDS)
DEFAULT_LANGUAGE = "en"
# `select_cases(split=...)`: settings are tuned on "tune" and reported on "heldout" too.
SPLITS = ("all", "tune", "heldout")


class DatasetError(ValueError):
    """Every problem of a data set file, each with its line number."""

    def __init__(self, source: str, problems: list[tuple[int, str]]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {source}:{line}: {message}" for line, message in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


@dataclass(frozen=True)
class EvalCase:
    id: str
    messages: list[dict[str, str]]
    preference: str
    preference_type: str
    checks: list[dict[str, Any]]
    line: int = 0
    notes: str = field(default="", compare=False)
    # Last and defaulted, so code that builds a case positionally still works.
    language: str = DEFAULT_LANGUAGE
    topic: tuple[str, ...] = ()


def _messages(record: dict[str, Any], problems: list[str]) -> list[dict[str, str]]:
    has_messages, has_prompt = "messages" in record, "prompt" in record
    if has_messages == has_prompt:
        problems.append("give exactly one of 'messages' or 'prompt'")
        return []
    if has_prompt:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append("'prompt' must be a non-empty string")
            return []
        return [{"role": "user", "content": prompt}]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        problems.append("'messages' must be a non-empty list")
        return []
    out = []
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or message["role"] not in ROLES
            or not isinstance(message["content"], str)
        ):
            problems.append(
                f"messages[{index}] must be {{'role': one of {sorted(ROLES)}, 'content': string}}"
            )
            continue
        out.append({"role": message["role"], "content": message["content"]})
    if out and out[-1]["role"] != "user":
        problems.append("the last message must be the user's")
    return out


def _string_field(record: dict[str, Any], key: str, problems: list[str]) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"'{key}' must be a non-empty string")
        return ""
    return value


def _language(record: dict[str, Any], problems: list[str]) -> str:
    language = record.get("language", DEFAULT_LANGUAGE)
    if language not in LANGUAGES:
        problems.append(f"'language' must be one of {', '.join(LANGUAGES)} (ISO 639-1), not {language!r}")
        return DEFAULT_LANGUAGE
    return language


def _topic(record: dict[str, Any], problems: list[str]) -> tuple[str, ...]:
    """An absent topic is no topic; a present one must say something (an
    empty list or a blank term would make every answer off topic)."""
    if "topic" not in record:
        return ()
    topic = record["topic"]
    if not isinstance(topic, list) or not topic or not all(isinstance(t, str) and t.strip() for t in topic):
        problems.append("'topic' must be a non-empty list of non-empty strings")
        return ()
    return tuple(topic)


def _checks(record: dict[str, Any], problems: list[str]) -> list[dict[str, Any]]:
    checks = record.get("checks")
    if not isinstance(checks, list) or not checks:
        problems.append("'checks' must be a non-empty list")
        return []
    for index, spec in enumerate(checks):
        try:
            validate_check(spec)
        except CheckSpecError as exc:
            problems.append(f"checks[{index}]: {exc}")
    return checks


def parse_case(record: Any, line: int) -> tuple[EvalCase | None, list[str]]:
    """One decoded JSON value -> (case, []) or (None, problems)."""
    if not isinstance(record, dict):
        return None, ["a case must be a JSON object"]
    problems: list[str] = []
    unknown = sorted(set(record) - FIELDS)
    if unknown:
        problems.append(f"unknown field(s) {unknown}; known: {sorted(FIELDS)}")
    case_id = record.get("id")
    if not isinstance(case_id, str | int) or isinstance(case_id, bool) or str(case_id).strip() == "":
        problems.append("'id' must be a non-empty string")
    messages = _messages(record, problems)
    preference = _string_field(record, "preference", problems)
    preference_type = _string_field(record, "preference_type", problems)
    checks = _checks(record, problems)
    notes = record.get("notes", "")
    if not isinstance(notes, str):
        problems.append("'notes' must be a string")
    language = _language(record, problems)
    topic = _topic(record, problems)
    if problems:
        return None, problems
    return EvalCase(str(case_id), messages, preference, preference_type, checks, line, notes, language, topic), []


def parse_cases(lines: Iterable[str], source: str = "<cases>") -> list[EvalCase]:
    """Parse JSONL text lines; raises DatasetError listing every problem."""
    cases: list[EvalCase] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not valid JSON: {exc.msg} (column {exc.colno})"))
            continue
        case, case_problems = parse_case(record, number)
        problems.extend((number, message) for message in case_problems)
        if case is None:
            continue
        if case.id in first_line:
            problems.append((number, f"duplicate id {case.id!r} (first on line {first_line[case.id]})"))
            continue
        first_line[case.id] = number
        cases.append(case)
    if not cases and not problems:
        problems.append((0, "no cases"))
    if problems:
        raise DatasetError(source, problems)
    return cases


def load_cases(path: str | Path) -> list[EvalCase]:
    """Load and validate a JSONL data set file (DatasetError, OSError)."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        return parse_cases(handle, str(path))


def split_of(cases: list[EvalCase]) -> dict[str, str]:
    """Case id -> "tune" or "heldout": within each preference type, in file
    order, the first ceil(n/2) cases tune and the rest are held out. Computed
    over the whole file, so a case's split does not depend on what else is
    selected, and every type is in both halves (given two cases or more)."""
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.preference_type] = counts.get(case.preference_type, 0) + 1
    seen: dict[str, int] = {}
    out = {}
    for case in cases:
        seen[case.preference_type] = seen.get(case.preference_type, 0) + 1
        tune = seen[case.preference_type] <= math.ceil(counts[case.preference_type] / 2)
        out[case.id] = "tune" if tune else "heldout"
    return out


def select_cases(
    cases: list[EvalCase],
    types: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    limit: int | None = None,
    split: str = "all",
) -> list[EvalCase]:
    """Filter by split ("all", "tune", "heldout": see split_of; pass the whole
    file), preference type and id; `limit` then keeps the first N per type
    (so a quick run still covers every type)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    splits = split_of(cases)
    types = set(types or ())
    ids = set(ids or ())
    chosen = [
        c
        for c in cases
        if (split == "all" or splits[c.id] == split)
        and (not types or c.preference_type in types)
        and (not ids or c.id in ids)
    ]
    if limit is None:
        return chosen
    kept: dict[str, int] = {}
    out = []
    for case in chosen:
        if kept.get(case.preference_type, 0) < limit:
            kept[case.preference_type] = kept.get(case.preference_type, 0) + 1
            out.append(case)
    return out
