"""Issue 12's bars from a `pad eval` run (answers.json, with every answer's
quality gate) of prompt vs `self` PAD vs the trained PersRM at the defaults:

1. self PAD gated satisfaction >= prompt's;
2. PersRM gated satisfaction >= prompt's + 10 points;
3. gate pass rate of both PAD modes >= prompt's - 5 points;

plus the same figures on trained and unseen preference types (types that
got no training pairs: data/train/build_cases.py).

    python scripts/persrm_report.py results/persrm/eval-heldout/answers.json [--pad MODE] [--persrm MODE]

Prints Markdown with Wilson and paired-bootstrap 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pad_core.evaluation.report import OVERALL, Answer, diff_text, pct, summarize  # noqa: E402

UNSEEN_TYPES = {"spanish", "avoid_word", "casual_tone"}  # no training pairs (data/train/build_cases.py)


def load(path: Path) -> list[Answer]:
    return [Answer(**a) for a in json.loads(path.read_text(encoding="utf-8"))["answers"]]


def bars(summary: dict, pad: str, persrm: str) -> list[tuple[str, float, float, bool]]:
    """(bar, measured points, required points, held)."""
    modes = summary["modes"]
    prompt_gated = modes["prompt"]["gated"][OVERALL]["rate"]
    prompt_gate = modes["prompt"]["gate"][OVERALL]["rate"]
    rows = []
    gated_pad = modes[pad]["gated"][OVERALL]["rate"] - prompt_gated
    rows.append((f"`{pad}` gated satisfaction - prompt's", 100 * gated_pad, 0.0, gated_pad >= 0))
    gated_rm = modes[persrm]["gated"][OVERALL]["rate"] - prompt_gated
    rows.append((f"`{persrm}` gated satisfaction - prompt's", 100 * gated_rm, 10.0, gated_rm >= 0.10 - 1e-9))
    for mode in (pad, persrm):
        gate = modes[mode]["gate"][OVERALL]["rate"] - prompt_gate
        rows.append((f"`{mode}` gate pass rate - prompt's", 100 * gate, -5.0, gate >= -0.05 - 1e-9))
    return rows


def table(summary: dict, modes: list[str], title: str) -> list[str]:
    lines = [f"#### {title}", "", "| mode | n | gated satisfaction | vs prompt (pts) | gate pass rate | vs prompt (pts) "
             "| raw satisfaction |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode in modes:
        e = summary["modes"][mode]
        vs = e.get("vs_baseline")
        lines.append(
            f"| {mode} | {e['n']} | {pct(e['gated'][OVERALL])} | {diff_text(vs['gated'][OVERALL]) if vs else '-'} "
            f"| {pct(e['gate'][OVERALL])} | {diff_text(vs['gate'][OVERALL]) if vs else '-'} "
            f"| {pct(e['satisfaction'][OVERALL])} |"
        )
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("answers", type=Path, help="answers.json of a `pad eval` run")
    parser.add_argument("--pad", default="pad", help="the self PAD mode's name (default: pad)")
    parser.add_argument("--persrm", default="pad[persrm]", help="the PersRM mode's name (default: pad[persrm])")
    args = parser.parse_args(argv)
    answers = load(args.answers)
    modes = ["prompt", args.pad, args.persrm]
    missing = [m for m in modes if m not in {a.mode for a in answers}]
    if missing:
        print(f"missing modes in {args.answers}: {missing}", file=sys.stderr)
        return 2
    answers = [a for a in answers if a.mode in modes]
    summary = summarize(answers, modes)
    out = table(summary, modes, f"All cases ({summary['modes']['prompt']['n']})")
    for label, keep in (("trained types", lambda t: t not in UNSEEN_TYPES), ("unseen types", lambda t: t in UNSEEN_TYPES)):
        part = [a for a in answers if keep(a.preference_type)]
        if part:
            out += table(summarize(part, modes), modes, f"{label.capitalize()} ({len(part) // len(modes)} cases)")
    out += ["#### Bars", "", "| bar | measured (pts) | required (pts) | held |", "| --- | ---: | ---: | :---: |"]
    for name, measured, required, held in bars(summary, args.pad, args.persrm):
        out.append(f"| {name} | {measured:+.0f} | >= {required:+.0f} | {'yes' if held else 'NO'} |")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
