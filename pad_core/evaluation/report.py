"""`pad eval`'s summaries, grid rule, Markdown and chart: pure functions over
answers (no I/O but the chart file).

Three rates per mode, each with a Wilson 95% interval:

- satisfaction:       the case's preference checks pass (raw, mechanical);
- gate pass rate:     the quality gate passes (quality alone, whatever the
                      preference): right language, real words, on topic, no
                      leakage, not a loop, coherent (quality.py);
- gated satisfaction: both. The headline: an answer counts only if it follows
                      the preference AND is still a good answer.

Paired differences to the baseline mode (`prompt`) use a paired bootstrap
over the cases both modes answered.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pad_core.evaluation.quality import GateResult
from pad_core.evaluation.stats import mean, mean_repeated_ngram_share, mean_words, paired_bootstrap_diff, rate

OVERALL = "overall"
RATES = ("gated", "satisfaction", "gate")
RATE_LABELS = {"gated": "gated satisfaction", "satisfaction": "raw satisfaction", "gate": "gate pass rate"}
# Grid rule: a setting is eligible when its gate pass rate is at least the
# baseline's minus this many points (issue 12).
GATE_TOLERANCE = 0.05


@dataclass
class Answer:
    case_id: str
    preference_type: str
    mode: str
    text: str
    satisfied: bool
    checks: list[bool] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    error: str | None = None
    decoding: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] | None = None  # GateResult.to_dict(); None until gated or when the request failed

    @property
    def gate_passed(self) -> bool:
        return bool(self.error is None and self.gate and self.gate["passed"])

    @property
    def gated(self) -> bool:
        return self.satisfied and self.gate_passed


def outcome(answer: Answer, which: str) -> bool:
    return {"gated": answer.gated, "satisfaction": answer.satisfied, "gate": answer.gate_passed}[which]


# ------------------------------------------------------------------- summary


def summarize(answers: Sequence[Answer], modes: Sequence[str], baseline: str = "prompt") -> dict[str, Any]:
    """Per mode: the three rates overall and per preference type, why the
    gate failed, the fluency figures, and paired differences to `baseline`."""
    by_mode: dict[str, list[Answer]] = {m: [] for m in modes}
    for a in answers:
        by_mode.setdefault(a.mode, []).append(a)
    types = sorted({a.preference_type for a in answers})
    out: dict[str, Any] = {"types": types, "baseline": baseline, "modes": {}}
    base_answers = {a.case_id: a for a in by_mode.get(baseline, [])}
    for mode, items in by_mode.items():
        texts = [a.text for a in items if a.error is None]
        failures: dict[str, int] = {name: 0 for name in GateResult.COMPONENTS}
        for a in items:
            for name in (a.gate or {}).get("failures", []):
                failures[name] += 1
        coherence = [a.gate["coherence_logprob"] for a in items if a.gate and a.gate.get("coherence_logprob") is not None]
        entry: dict[str, Any] = {
            which: {t: rate([outcome(a, which) for a in items if t == OVERALL or a.preference_type == t]).to_dict()
                    for t in [OVERALL, *types]}
            for which in RATES
        }
        entry |= {
            "gate_failures": failures,
            "coherence_mean": mean(coherence) if coherence else None,
            "repeated_4gram_share": mean_repeated_ngram_share(texts),
            "mean_words": mean_words(texts),
            "truncated": sum(a.finish_reason == "length" for a in items),
            "errors": sum(a.error is not None for a in items),
            "n": len(items),
        }
        if base_answers and mode != baseline:
            entry["vs_baseline"] = {which: _paired(items, base_answers, types, which) for which in RATES}
        out["modes"][mode] = entry
    return out


def _paired(items: Sequence[Answer], base_answers: dict[str, Answer], types: Sequence[str], which: str) -> dict:
    result = {}
    for t in [OVERALL, *types]:
        pairs = [(outcome(a, which), outcome(base_answers[a.case_id], which)) for a in items
                 if a.case_id in base_answers and (t == OVERALL or a.preference_type == t)]
        diff, low, high = paired_bootstrap_diff([p[0] for p in pairs], [p[1] for p in pairs])
        result[t] = {"diff": diff, "ci_low": low, "ci_high": high, "n": len(pairs)}
    return result


def pct(r: dict[str, Any]) -> str:
    if not r["n"]:
        return "-"
    return f"{100 * r['rate']:.0f}% [{100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f}]"


def diff_text(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "-"
    return f"{100 * d['diff']:+.0f} [{100 * d['ci_low']:+.0f}, {100 * d['ci_high']:+.0f}]"


def _coherence(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_report(summary: dict[str, Any], title: str = "Gated satisfaction by preference type") -> str:
    modes = list(summary["modes"])
    types = summary["types"]
    first = summary["modes"][modes[0]]
    lines = [f"### {title}", "",
             "Share of answers that pass every check of their case AND the quality gate, "
             "with Wilson 95% intervals.", ""]
    lines.append("| preference type | n | " + " | ".join(modes) + " |")
    lines.append("| --- | ---: |" + " ---: |" * len(modes))
    for t in [*types, OVERALL]:
        label = f"**{t}**" if t == OVERALL else t
        cells = [pct(summary["modes"][m]["gated"][t]) for m in modes]
        lines.append(f"| {label} | {first['gated'][t]['n']} | " + " | ".join(cells) + " |")
    lines += ["", "### Quality", "",
              "Gate pass rate: quality alone, whatever the preference. Raw satisfaction: the preference "
              "checks alone (a gibberish answer can pass them). Gate failures count answers failing each "
              "component. Coherence: mean token log-probability under the base model, given the question "
              "with the preference as a system message.", "",
              "| mode | gated satisfaction | gate pass rate | raw satisfaction | language | real words | on topic "
              "| leakage | loop | coherence (fail) | mean coherence | repeated 4-gram share | mean words "
              "| truncated | errors |",
              "| --- |" + " ---: |" * 14]
    for m in modes:
        e = summary["modes"][m]
        f = e["gate_failures"]
        lines.append(
            f"| {m} | {pct(e['gated'][OVERALL])} | {pct(e['gate'][OVERALL])} | {pct(e['satisfaction'][OVERALL])} "
            f"| {f['language']} | {f['real_words']} | {f['on_topic']} | {f['no_leakage']} | {f['not_a_loop']} "
            f"| {f['coherence']} | {_coherence(e['coherence_mean'])} | {e['repeated_4gram_share']:.3f} "
            f"| {e['mean_words']:.1f} | {e['truncated']} | {e['errors']} |"
        )
    compared = [m for m in modes if "vs_baseline" in summary["modes"][m]]
    if compared:
        baseline = summary["baseline"]
        lines += ["", f"### Difference to `{baseline}` (percentage points, paired bootstrap 95% interval)", "",
                  "Gated satisfaction by preference type; the last rows compare the gate pass rate and the raw "
                  "satisfaction overall.", "",
                  "| preference type | " + " | ".join(compared) + " |", "| --- |" + " ---: |" * len(compared)]
        for t in [*types, OVERALL]:
            label = f"**{t}** (gated)" if t == OVERALL else t
            lines.append(f"| {label} | " + " | ".join(diff_text(summary["modes"][m]["vs_baseline"]["gated"][t])
                                                   for m in compared) + " |")
        for which in ("gate", "satisfaction"):
            lines.append(f"| {RATE_LABELS[which]} | " + " | ".join(
                diff_text(summary["modes"][m]["vs_baseline"][which][OVERALL]) for m in compared) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- samples


def sample_case_ids(answers: Sequence[Answer], count: int = 10, seed: int = 0) -> list[str]:
    """`count` case ids drawn with a fixed seed (not picked by hand), in data set order."""
    ids = list(dict.fromkeys(a.case_id for a in answers))
    chosen = set(random.Random(seed).sample(ids, min(count, len(ids))))
    return [i for i in ids if i in chosen]


def _one_line(text: str, limit: int) -> str:
    flat = " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    flat = flat.replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def samples_markdown(answers: Sequence[Answer], modes: Sequence[str], questions: dict[str, tuple[str, str]],
                     count: int = 10, seed: int = 0, limit: int = 320) -> str:
    """Every mode's answer to the same `count` cases, drawn by `seed`.
    questions: case id -> (last user message, preference)."""
    by_key = {(a.case_id, a.mode): a for a in answers}
    lines = [f"### {count} cases drawn with seed {seed}: every mode's answer", "",
             "✅ gated (checks and gate pass), ☑️ gate passes but a check fails, ❌ the gate fails (components named).",
             ""]
    for case_id in sample_case_ids(answers, count, seed):
        question, preference = questions.get(case_id, ("?", "?"))
        lines.append(f"**{case_id}**: *{_one_line(question, 200)}* (preference: *{_one_line(preference, 200)}*)")
        lines.append("")
        for mode in modes:
            a = by_key.get((case_id, mode))
            if a is None:
                continue
            if a.error:
                mark = f"❌ error: {_one_line(a.error, 80)}"
            elif a.gated:
                mark = "✅"
            elif a.gate_passed:
                mark = "☑️"
            else:
                mark = "❌ " + ", ".join((a.gate or {}).get("failures", []))
            lines.append(f"- `{mode}` {mark}: {_one_line(a.text, limit)}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- chart


def plot_summary(summary: dict[str, Any], path: Path, title: str, which: str = "gated") -> None:
    """Grouped bars: `which` rate by preference type (and overall), one bar
    per mode, Wilson 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary["modes"])
    groups = [*summary["types"], OVERALL]
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(min(18.0, max(8.0, 2 + 0.22 * len(groups) * len(modes))), 5.0))
    for i, m in enumerate(modes):
        entries = [summary["modes"][m][which][g] for g in groups]
        values = [100 * e["rate"] if e["n"] else 0 for e in entries]
        lower = [max(0.0, 100 * (e["rate"] - e["ci_low"])) if e["n"] else 0 for e in entries]
        upper = [max(0.0, 100 * (e["ci_high"] - e["rate"])) if e["n"] else 0 for e in entries]
        xs = [g + (i - (len(modes) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=m, yerr=[lower, upper], capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(f"{RATE_LABELS[which]} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- grid


def setting_of(name: str) -> dict[str, str]:
    """'pad w=4 k=80 p=0.05 bsp=0' -> {'w': '4', 'k': '80', 'p': '0.05', 'bsp': '0'}."""
    return dict(part.split("=", 1) for part in name.split() if "=" in part)


def choose_best(summary: dict[str, Any], baseline: str = "prompt", tolerance: float = GATE_TOLERANCE) -> dict[str, Any]:
    """The grid rule (issue 12): among PAD settings whose gate pass rate is at
    least the baseline's minus `tolerance`, the best gated satisfaction (ties:
    the higher gate pass rate, then the lower weight). Rows for every setting."""
    base = summary["modes"][baseline]
    floor = base["gate"][OVERALL]["rate"] - tolerance
    rows = []
    for name, e in summary["modes"].items():
        if not name.startswith("pad"):
            continue
        rows.append({
            "mode": name,
            "gated": e["gated"][OVERALL],
            "gate": e["gate"][OVERALL],
            "satisfaction": e["satisfaction"][OVERALL],
            "repeated_4gram_share": e["repeated_4gram_share"],
            "mean_words": e["mean_words"],
            "eligible": e["gate"][OVERALL]["rate"] >= floor - 1e-12,
            "vs_baseline": e.get("vs_baseline", {}).get("gated", {}).get(OVERALL),
        })
    eligible = [r for r in rows if r["eligible"]]
    best = max(eligible, key=lambda r: (r["gated"]["rate"], r["gate"]["rate"], -float(setting_of(r["mode"]).get("w", 0))),
               default=None)
    return {
        "baseline": baseline,
        "baseline_gated": base["gated"][OVERALL],
        "baseline_gate": base["gate"][OVERALL],
        "gate_floor": floor,
        "rows": rows,
        "best": best["mode"] if best else None,
        "best_at_least_baseline": bool(best and best["gated"]["rate"] >= base["gated"][OVERALL]["rate"]),
    }


DEFAULT_VARIABLES = (("w", "PAD_DEFAULT_WEIGHT"), ("k", "PAD_DEFAULT_TOP_K"), ("p", "PAD_DEFAULT_MIN_P"))


def grid_markdown(choice: dict[str, Any]) -> str:
    baseline = choice["baseline"]
    lines = [
        "### PAD settings grid",
        "",
        f"`{baseline}`: gated satisfaction {pct(choice['baseline_gated'])}, gate pass rate "
        f"{pct(choice['baseline_gate'])}; a setting is eligible when its gate pass rate is at least "
        f"{100 * choice['gate_floor']:.0f}% (`{baseline}`'s minus {100 * GATE_TOLERANCE:.0f} points).",
        "",
        f"| setting | gated satisfaction | vs {baseline} (pts) | gate pass rate | raw satisfaction "
        "| repeated 4-gram share | mean words | eligible |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in sorted(choice["rows"], key=lambda r: (-r["gated"]["rate"], -r["gate"]["rate"])):
        mark = "**" if r["mode"] == choice["best"] else ""
        diff = diff_text(r["vs_baseline"]) if r["vs_baseline"] else "-"
        lines.append(
            f"| {mark}{r['mode']}{mark} | {pct(r['gated'])} | {diff} | {pct(r['gate'])} | {pct(r['satisfaction'])} "
            f"| {r['repeated_4gram_share']:.3f} | {r['mean_words']:.1f} | {'yes' if r['eligible'] else 'no'} |"
        )
    lines.append("")
    if choice["best"]:
        verdict = "at least as good as" if choice["best_at_least_baseline"] else "WORSE than"
        lines.append(f"Best eligible setting: **{choice['best']}**, {verdict} `{baseline}` in gated satisfaction.")
        settings = setting_of(choice["best"])
        env = " ".join(f"{var}={settings[key]}" for key, var in DEFAULT_VARIABLES if key in settings)
        if env:
            lines.append(f"As server defaults: `{env}`" + (
                " (and `pad.base_sees_preference: true` per request)." if settings.get("bsp") == "1" else "."))
    else:
        lines.append(f"No PAD setting keeps its gate pass rate within {100 * GATE_TOLERANCE:.0f} points of `{baseline}`.")
    return "\n".join(lines) + "\n"
