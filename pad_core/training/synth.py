"""`pad data synth`: preference pairs made by the embedded model itself.

For each (prompt, preference) with verifiable checks (the `pad eval` data
set format, with `language` and `topic`), sample answers two ways:

- with the preference as a plain system message (what a user would type;
  not PAD's reward template, whose wording the model then parrots), and
- without it (plain answers, sampled once per question and shared by every
  preference on that question).

Every answer goes through the quality gate (pad_core/evaluation/quality.py).
A pair is (chosen, rejected) where

- chosen:   passes every check of the case AND the gate (in the case's language);
- rejected: fluent but misses the preference: passes the gate in the
            language it was asked in, fails a check. So the reward model learns
            the preference, not "gibberish is bad".

Optionally (`--degenerate-share`), a share of the pairs takes a degenerate
rejected answer instead (wrong language, leakage, invented words, a loop),
to teach the reward that junk never follows a preference; keep it only if
it helps on the held-out eval. Coherence, the gate's model-based part, is not
scored here: the other components judge the samples.

Optionally (`--loop-share`), a share of the pairs gets a second pair with
the same winner and, as the loser, that winner falling into a loop: its first
sentence, then the line repeated, a count ("1. 2. 3. ...") or a numbered list
of the same words. Sampling at temperature 0.8 almost never produces these,
but a reward-guided greedy decoder does: they are what a reward trained only
on sampled answers was seen to promote (the first retrained PersRM answered
"1. 1. 1. 2. 3. ..."). Each variant must fail the gate's loop check. With
`--pairs-in`, the loop pairs are added to a previous run's pairs, with no
sampling.

All samples of all cases decode in one continuously batched engine run.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from pad_core.evaluation.checks import run_check
from pad_core.evaluation.quality import QualityGate, is_loop
from pad_core.training.pairs import PreferencePair, write_pairs
from pad_core.types import ChatRequest, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthCase:
    case_id: str
    messages: tuple[tuple[str, str], ...]
    preference: str
    checks: tuple[dict, ...]
    language: str = "en"
    topic: tuple[str, ...] = ()
    # How a plain (no-preference) answer to this question is judged for
    # fluency: the conversation's own language and topic terms in it.
    plain_language: str = "en"
    plain_topic: tuple[str, ...] = ()


@dataclass
class Sample:
    text: str
    with_preference: bool


@dataclass
class Judged:
    """A case's distinct samples, sorted into the three pools."""

    chosen: list[str] = field(default_factory=list)
    fluent_misses: list[str] = field(default_factory=list)
    degenerate: list[str] = field(default_factory=list)


def check_score(text: str, checks: tuple[dict, ...]) -> float:
    """Share of the checks an answer passes (1.0 = all)."""
    return sum(run_check(text, spec) for spec in checks) / len(checks)


def judge(case: SynthCase, samples: Sequence[Sample], gate: QualityGate) -> Judged:
    """Sorts distinct non-empty samples: chosen (checks and gate pass in the
    case's language), fluent misses (a check fails, the gate passes in the
    language the answer was asked in), degenerate (the gate fails)."""
    judged = Judged()
    seen: set[str] = set()
    for sample in samples:
        text = sample.text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        follows = check_score(text, case.checks) == 1.0
        in_target = gate.check(text, language=case.language, topic=case.topic, preference=case.preference).passed
        if follows and in_target:
            judged.chosen.append(text)
            continue
        if sample.with_preference:
            fluent = in_target
        else:  # a plain answer is judged in the conversation's language
            fluent = gate.check(text, language=case.plain_language, topic=case.plain_topic or case.topic,
                                preference=case.preference).passed
        if follows:
            continue  # follows the preference but is not good: neither a winner nor a clean loser
        (judged.fluent_misses if fluent else judged.degenerate).append(text)
    return judged


def in_share(index: int, share: float) -> bool:
    """Whether item `index` is one of an evenly spread `share` of items: the
    running count share * (index + 1) steps up there (a share of 0.25 gives
    items 3, 7, 11, ...)."""
    return int((index + 1) * share) > int(index * share)


def pick_pairs(case: SynthCase, judged: Judged, per_case: int, degenerate_share: float = 0.0,
               rng: random.Random | None = None) -> list[PreferencePair]:
    """Up to `per_case` pairs, each chosen and rejected answer used once; a
    `degenerate_share` of them take a degenerate loser when there is one."""
    rng = rng or random.Random(0)
    chosen = list(judged.chosen)
    fluent, degenerate = list(judged.fluent_misses), list(judged.degenerate)
    rng.shuffle(chosen)
    rng.shuffle(fluent)
    rng.shuffle(degenerate)
    pairs = []
    for index, winner in enumerate(chosen[:per_case]):
        want_degenerate = in_share(index, degenerate_share)
        pool = degenerate if want_degenerate and degenerate else fluent
        if not pool:
            break
        pairs.append(PreferencePair(case.messages, case.preference, winner, pool.pop()))
    return pairs


LOOP_KINDS = ("repeat_line", "count", "numbered_repeat")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def loop_variant(text: str, kind: str, length: int | None = None) -> str | None:
    """`text` falling into a loop of the given kind, about as long as the
    original (or `length` characters); None when the answer has no sentence
    to start from. Pure: the same answer and kind give the same loop."""
    sentences = [s.strip() for s in SENTENCE_END.split(text.strip()) if len(s.strip().split()) >= 2]
    if not sentences:
        return None
    length = max(length or len(text), 300)  # a loop needs room to be one (96 tokens are ~400 characters)
    opening = sentences[0]
    if kind == "repeat_line":  # "To learn to juggle, practice.\n\nPractice regularly.\n\nPractice regularly..."
        line = sentences[1] if len(sentences) > 1 else sentences[0]
        out, repeats = opening, 0
        while len(out) < length or repeats < 3:
            out += "\n\n" + line
            repeats += 1
        return out
    if kind == "count":  # "Here are some tips: 1. 2. 3. 4. ..."
        out, number = opening, 1
        while len(out) < length:
            out += f" {number}."
            number += 1
        return out
    if kind == "numbered_repeat":  # "1. Beach towel\n2. Beach towel\n3. Beach towel..."
        phrase = " ".join(opening.rstrip(".!?").split()[:3])
        lines, number = [], 1
        while sum(len(line) + 1 for line in lines) < length:
            lines.append(f"{number}. {phrase}")
            number += 1
        return "\n".join(lines)
    raise ValueError(f"unknown loop kind {kind!r}")


def add_loop_pairs(pairs: Sequence[PreferencePair], share: float, rng: random.Random) -> list[PreferencePair]:
    """`pairs` plus, for a `share` of them (spread evenly), a pair with the
    same winner and a loop of it as the loser (a kind drawn by `rng`); a
    variant the gate's loop check would not fail is not used."""
    out = list(pairs)
    for index, pair in enumerate(pairs):
        if not in_share(index, share):
            continue
        kinds = list(LOOP_KINDS)
        rng.shuffle(kinds)
        for kind in kinds:
            looped = loop_variant(pair.chosen, kind)
            if looped is not None and is_loop(looped):
                out.append(PreferencePair(pair.messages, pair.preference, pair.chosen, looped))
                break
    return out


def synthesize(engine, cases: list[SynthCase], samples: int, temperature: float, max_tokens: int, per_case: int,
               seed: int = 0, plain_samples: int = 4, degenerate_share: float = 0.0,
               gate: QualityGate | None = None, judged_out: dict[str, Judged] | None = None,
               ) -> tuple[list[PreferencePair], dict]:
    """Samples, judges and pairs. Returns (pairs, stats); `judged_out`, when
    given, receives every case's sorted samples (to pair them again later)."""
    gate = gate or QualityGate()
    questions = list(dict.fromkeys(case.messages for case in cases))
    requests = []
    for case in cases:
        chat = preference_messages([{"role": r, "content": c} for r, c in case.messages], case.preference)
        for index in range(samples):
            requests.append(ChatRequest(f"p:{case.case_id}#{index}", chat, sampling=SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=seed + index)))
    for number, question in enumerate(questions):
        chat = [{"role": r, "content": c} for r, c in question]
        for index in range(plain_samples):
            requests.append(ChatRequest(f"q:{number}#{index}", chat, sampling=SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=seed + 1000 + index)))
    texts: dict[str, list[str]] = defaultdict(list)
    with tqdm(total=len(requests), desc="sampling", unit="answer") as progress:
        for output in engine.generate(requests):
            texts[output.request_id].append(output.text)
            if output.finished:
                progress.update(1)
    answers = {request_id: "".join(parts) for request_id, parts in texts.items()}
    plain: dict[tuple, list[Sample]] = {
        question: [Sample(answers.get(f"q:{number}#{i}", ""), False) for i in range(plain_samples)]
        for number, question in enumerate(questions)
    }
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    stats: Counter = Counter()
    for case in cases:
        own = [Sample(answers.get(f"p:{case.case_id}#{i}", ""), True) for i in range(samples)]
        judged = judge(case, own + plain[case.messages], gate)
        if judged_out is not None:
            judged_out[case.case_id] = judged
        stats["chosen"] += len(judged.chosen)
        stats["fluent_misses"] += len(judged.fluent_misses)
        stats["degenerate"] += len(judged.degenerate)
        case_pairs = pick_pairs(case, judged, per_case, degenerate_share, rng)
        stats["cases_with_pairs"] += bool(case_pairs)
        stats["degenerate_rejected"] += sum(p.rejected in judged.degenerate for p in case_pairs)
        pairs.extend(case_pairs)
    return pairs, dict(stats)


def preference_messages(messages: list[dict[str, str]], preference: str) -> list[dict[str, str]]:
    """The preference as the (first) system message, as a user would write it."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{preference}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": preference}, *messages]


def cases_from_eval_file(path: Path, exclude_ids: set[str]) -> list[SynthCase]:
    """Synth cases from a data set file; a plain answer to a question is
    judged with the topic terms of an English case on the same question."""
    from pad_core.evaluation.dataset import load_cases

    loaded = [case for case in load_cases(path) if case.id not in exclude_ids]
    english_topic: dict[tuple, tuple[str, ...]] = {}
    for case in loaded:
        key = tuple((m["role"], m["content"]) for m in case.messages)
        if case.language == "en" and case.topic and key not in english_topic:
            english_topic[key] = tuple(case.topic)
    out = []
    for case in loaded:
        key = tuple((m["role"], m["content"]) for m in case.messages)
        out.append(SynthCase(case.id, key, case.preference, tuple(case.checks), case.language, tuple(case.topic),
                             "en", english_topic.get(key, ())))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pad data synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="?",
                        help="JSONL in the `pad eval` data set format (cases with checks, language, topic)")
    parser.add_argument("--out", required=True, help="pairs JSONL to write")
    parser.add_argument("--samples", type=int, default=6, help="answers sampled per case with the preference (default: 6)")
    parser.add_argument("--plain-samples", type=int, default=4,
                        help="answers sampled per question without a preference, shared by its cases (default: 4)")
    parser.add_argument("--pairs-per-case", type=int, default=2, help="(default: 2)")
    parser.add_argument("--degenerate-share", type=float, default=0.0,
                        help="share of pairs whose rejected answer is degenerate (wrong language, leakage, "
                        "gibberish, a loop) instead of fluent (default: 0)")
    parser.add_argument("--loop-share", type=float, default=0.0,
                        help="share of pairs that also get a pair whose loser is the winner falling into a loop "
                        "(default: 0)")
    parser.add_argument("--pairs-in", help="skip sampling: add the loop pairs (--loop-share) to this pairs JSONL "
                        "from an earlier run")
    parser.add_argument("--temperature", type=float, default=0.8, help="(default: 0.8)")
    parser.add_argument("--max-tokens", type=int, default=96, help="(default: 96)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--exclude-ids", default="", help="comma-separated case ids to leave out (held-out eval prompts)")
    parser.add_argument("--limit-questions", type=int,
                        help="keep only the cases of the first N distinct questions (a cheaper run)")
    parser.add_argument("--skip-questions", type=int, default=0,
                        help="leave out the cases of the first N distinct questions (to continue a cheaper run)")
    parser.add_argument("--samples-out", help="also write every case's judged samples (chosen, fluent misses, "
                        "degenerate) to this JSONL, to pair them again without sampling")
    parser.add_argument("--model", default="embedded", help="(default: embedded)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("degenerate_share", "loop_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.pairs_in:
        from pad_core.training.pairs import load_pairs

        given = load_pairs(args.pairs_in)
        pairs = add_loop_pairs(given, args.loop_share, random.Random(args.seed))
        write_pairs(args.out, pairs)
        sys.stdout.write(json.dumps({"pairs_in": len(given), "pairs": len(pairs), "loop_pairs": len(pairs) - len(given),
                                     "out": args.out}) + "\n")
        return 0
    if not args.cases:
        parser.error("the cases file is required (unless --pairs-in)")
    from pad_core.model_loading import load_engine
    from pad_core.settings import EngineSettings

    cases = cases_from_eval_file(Path(args.cases), {i for i in args.exclude_ids.split(",") if i})
    questions = list(dict.fromkeys(c.messages for c in cases))[args.skip_questions:]
    if args.limit_questions:
        questions = questions[: args.limit_questions]
    kept = set(questions)
    cases = [c for c in cases if c.messages in kept]
    engine = load_engine(EngineSettings(model=args.model))
    judged: dict[str, Judged] = {}
    pairs, stats = synthesize(engine, cases, args.samples, args.temperature, args.max_tokens, args.pairs_per_case,
                              args.seed, args.plain_samples, args.degenerate_share, judged_out=judged)
    loops_before = len(pairs)
    pairs = add_loop_pairs(pairs, args.loop_share, random.Random(args.seed))
    stats["loop_pairs"] = len(pairs) - loops_before
    write_pairs(args.out, pairs)
    if args.samples_out:
        with Path(args.samples_out).open("w", encoding="utf-8") as handle:
            for case_id, sorted_samples in judged.items():
                handle.write(json.dumps({"case_id": case_id, **asdict(sorted_samples)}, ensure_ascii=False) + "\n")
    sys.stdout.write(json.dumps({"cases": len(cases), "pairs": len(pairs), **stats, "out": args.out}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
