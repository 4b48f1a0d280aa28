"""Issue 6's two bars from a `pad eval` answers file of the PersRM experiment
(scripts/persrm-experiment.sh):

1. trained preference types: PersRM vs `prompt`, at least +10 points, with
   the fluency guard (repeated 4-gram share at most 1.5x prompt's);
2. preference types absent from training: PersRM vs `self` at the same
   weight, no worse.

    python scripts/persrm_report.py results/persrm/eval/answers.jsonl

Prints a Markdown table with paired-bootstrap 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pad_core.evaluation.stats import mean_repeated_ngram_share, paired_bootstrap_diff, rate  # noqa: E402

UNSEEN_TYPES = {"spanish", "avoid_word", "casual_tone"}  # data/train/build_cases.py
FLUENCY_FACTOR = 1.5


def load(path: Path) -> dict[str, dict[str, dict]]:
    """mode -> case id -> answer record"""
    answers: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        answers[record["mode"]][record["case_id"]] = record
    return answers


def pct(r) -> str:
    return f"{100 * r.value:.0f}% [{100 * r.low:.0f}-{100 * r.high:.0f}]"


def diff(a: list[dict], b: list[dict]) -> tuple[float, str]:
    d, low, high = paired_bootstrap_diff([x["satisfied"] for x in a], [y["satisfied"] for y in b])
    return d, f"{100 * d:+.0f} [{100 * low:+.0f}, {100 * high:+.0f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("answers", type=Path)
    args = parser.parse_args()
    answers = load(args.answers)
    prompt = answers["prompt"]
    trained_ids = sorted(i for i, a in prompt.items() if a["preference_type"] not in UNSEEN_TYPES)
    unseen_ids = sorted(i for i, a in prompt.items() if a["preference_type"] in UNSEEN_TYPES)
    prompt_share = mean_repeated_ngram_share([a["text"] for a in prompt.values()])
    print(f"trained types: {len(trained_ids)} cases; unseen types ({', '.join(sorted(UNSEEN_TYPES))}): {len(unseen_ids)} cases")
    print(f"prompt: repeated 4-gram share {prompt_share:.3f} (guard: at most {FLUENCY_FACTOR * prompt_share:.3f})\n")
    print("| weight | trained: prompt | trained: PersRM | PersRM - prompt (pts) | unseen: self | unseen: PersRM "
          "| PersRM - self (pts) | PersRM 4-gram share | bars |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    for mode in sorted(answers):
        match = re.fullmatch(r"pad\[persrm\] (w=\S+)(.*)", mode)
        if not match:
            continue
        persrm = answers[mode]
        self_mode = f"pad {match.group(1)}{match.group(2)}"
        self_answers = answers.get(self_mode, {})
        trained_p = [prompt[i] for i in trained_ids]
        trained_r = [persrm[i] for i in trained_ids]
        unseen_s = [self_answers[i] for i in unseen_ids if i in self_answers]
        unseen_r = [persrm[i] for i in unseen_ids if i in self_answers]
        gain, gain_text = diff(trained_r, trained_p)
        loss, loss_text = diff(unseen_r, unseen_s) if unseen_s else (float("nan"), "-")
        share = mean_repeated_ngram_share([a["text"] for a in persrm.values()])
        holds = gain >= 0.10 and share <= FLUENCY_FACTOR * prompt_share and loss >= 0
        print(
            f"| {match.group(1)}{match.group(2)} | {pct(rate([a['satisfied'] for a in trained_p]))} "
            f"| {pct(rate([a['satisfied'] for a in trained_r]))} | {gain_text} "
            f"| {pct(rate([a['satisfied'] for a in unseen_s])) if unseen_s else '-'} "
            f"| {pct(rate([a['satisfied'] for a in unseen_r])) if unseen_r else '-'} | {loss_text} "
            f"| {share:.3f} | {'hold' if holds else 'miss'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
