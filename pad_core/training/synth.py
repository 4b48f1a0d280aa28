"""`pad data synth`: preference pairs made by the embedded model itself.

For each (prompt, preference) with verifiable checks (the `pad eval` data
set format), sample several answers with the preference in the system
prompt, score each by the share of checks it passes, and keep a pair when
one answer passes every check and another fails at least one: a clear
winner and loser. All samples of all cases decode in one continuously
batched engine run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pad_core.engine import PadEngine
from pad_core.evaluation.checks import run_check
from pad_core.prompting import with_preference
from pad_core.settings import EngineSettings
from pad_core.training.pairs import PreferencePair, write_pairs
from pad_core.types import ChatRequest, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthCase:
    case_id: str
    messages: tuple[tuple[str, str], ...]
    preference: str
    checks: tuple[dict, ...]


def check_score(text: str, checks: tuple[dict, ...]) -> float:
    """Share of the checks an answer passes (1.0 = all)."""
    return sum(run_check(text, spec) for spec in checks) / len(checks)


def pick_pairs(case: SynthCase, answers: list[str], per_case: int) -> list[PreferencePair]:
    """Best passing answers against worst failing ones, distinct texts only."""
    scored = sorted({a.strip(): check_score(a, case.checks) for a in answers if a.strip()}.items(), key=lambda kv: -kv[1])
    winners = [text for text, score in scored if score == 1.0]
    losers = [text for text, score in reversed(scored) if score < 1.0]
    return [
        PreferencePair(case.messages, case.preference, chosen, rejected)
        for chosen, rejected in list(zip(winners, losers))[:per_case]
    ]


def synthesize(engine: PadEngine, cases: list[SynthCase], samples: int, temperature: float, max_tokens: int,
               per_case: int, seed: int = 0) -> list[PreferencePair]:
    requests = []
    for case in cases:
        chat = with_preference(
            [{"role": r, "content": c} for r, c in case.messages], engine.settings.preference_template, case.preference
        )
        for index in range(samples):
            requests.append(
                ChatRequest(
                    f"{case.case_id}#{index}",
                    chat,
                    sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + index),
                )
            )
    texts: dict[str, list[str]] = defaultdict(list)
    with tqdm(total=len(requests), desc="sampling", unit="answer") as progress:
        for output in engine.generate(requests):
            texts[output.request_id].append(output.text)
            if output.finished:
                progress.update(1)
    answers: dict[str, list[str]] = defaultdict(list)
    for request_id, parts in texts.items():
        answers[request_id.rsplit("#", 1)[0]].append("".join(parts))
    pairs = []
    for case in cases:
        pairs.extend(pick_pairs(case, answers[case.case_id], per_case))
    return pairs


def cases_from_eval_file(path: Path, exclude_ids: set[str]) -> list[SynthCase]:
    from pad_core.evaluation.dataset import load_cases

    return [
        SynthCase(case.id, tuple((m["role"], m["content"]) for m in case.messages), case.preference, tuple(case.checks))
        for case in load_cases(path)
        if case.id not in exclude_ids
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pad data synth", description=__doc__)
    parser.add_argument("cases", help="JSONL in the `pad eval` data set format (cases with checks)")
    parser.add_argument("--out", required=True, help="pairs JSONL to write")
    parser.add_argument("--samples", type=int, default=8, help="answers sampled per case")
    parser.add_argument("--pairs-per-case", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude-ids", default="", help="comma-separated case ids to leave out (held-out eval prompts)")
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cases = cases_from_eval_file(Path(args.cases), {i for i in args.exclude_ids.split(",") if i})
    engine = PadEngine.from_settings(EngineSettings(model=args.model))
    pairs = synthesize(engine, cases, args.samples, args.temperature, args.max_tokens, args.pairs_per_case, args.seed)
    write_pairs(args.out, pairs)
    covered = len({p.messages + (("pref", p.preference),) for p in pairs})
    print(json.dumps({"cases": len(cases), "pairs": len(pairs), "cases_with_pairs": covered, "out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
