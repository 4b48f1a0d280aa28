"""`pad eval`: does the answer follow the user's preference?

Runs a JSONL data set of (prompt, preference, verifiable checks) through any
OpenAI-compatible endpoint with the official `openai` SDK, in several modes
on the same cases, model and decoding settings:

  base             no preference at all
  prompt           the preference as a system message, plain decoding
                   (what a user would do without PAD)
  prompt-template  the preference in PAD's reward-context template as the
                   system message, plain decoding
  pad              PAD decoding (`preference` + `pad` body fields), one mode
                   per --weights value and per --reward-models name

and reports per-mode and per-preference-type satisfaction rates with Wilson
95% intervals, PAD-minus-prompt differences with paired-bootstrap intervals,
a fluency guard (share of repeated word 4-grams, mean words), a JSON file
with every answer, a Markdown report and a PNG chart.

`--grid` instead sweeps PAD settings (weights x top_k x base_sees_preference)
and picks the best one whose repeated-4-gram share stays within 1.5x
prompt's (the rule for the server defaults).

Without --base-url it starts `pad serve` on the embedded model on a free
local port and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pad_core.evaluation.checks import run_check
from pad_core.evaluation.dataset import DatasetError, EvalCase, load_cases, select_cases
from pad_core.evaluation.stats import (
    mean_repeated_ngram_share,
    mean_words,
    paired_bootstrap_diff,
    rate,
)
from pad_core.prompting import with_preference
from pad_core.settings import DEFAULT_PREFERENCE_TEMPLATE

logger = logging.getLogger(__name__)

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "data" / "eval" / "dev.jsonl"
FLUENCY_FACTOR = 1.5  # grid rule: repeated-4-gram share at most 1.5x prompt's
OVERALL = "overall"


# --------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Decoding:
    """Settings shared by every mode (the comparison holds them fixed)."""

    model: str
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0


@dataclass(frozen=True)
class Mode:
    """How one request of a case is sent. `kind` is base, prompt,
    prompt-template or pad; the pad fields are only sent when set, so None
    means the server's default."""

    kind: str
    weight: float | None = None
    top_k: int | None = None
    reward_model: str | None = None
    base_sees_preference: bool | None = None

    @property
    def name(self) -> str:
        if self.kind != "pad":
            return self.kind
        parts = ["pad" if self.reward_model in (None, "self") else f"pad[{self.reward_model}]"]
        if self.weight is not None:
            parts.append(f"w={self.weight:g}")
        if self.top_k is not None:
            parts.append(f"k={self.top_k}")
        if self.base_sees_preference is not None:
            parts.append(f"bsp={int(self.base_sees_preference)}")
        return " ".join(parts)

    def pad_body(self) -> dict[str, Any]:
        fields = {
            "weight": self.weight,
            "top_k": self.top_k,
            "reward_model": self.reward_model,
            "base_sees_preference": self.base_sees_preference,
        }
        return {key: value for key, value in fields.items() if value is not None}

    def request(self, case: EvalCase, decoding: Decoding) -> dict[str, Any]:
        """Keyword arguments of `client.chat.completions.create` for this case."""
        messages = [dict(m) for m in case.messages]
        extra_body: dict[str, Any] = {}
        if self.kind == "prompt":
            messages = prompt_messages(messages, case.preference)
        elif self.kind == "prompt-template":
            messages = with_preference(messages, DEFAULT_PREFERENCE_TEMPLATE, case.preference)
        elif self.kind == "pad":
            extra_body["preference"] = case.preference
            pad = self.pad_body()
            if pad:
                extra_body["pad"] = pad
        elif self.kind != "base":
            raise ValueError(f"unknown mode kind {self.kind!r}")
        kwargs: dict[str, Any] = {
            "model": decoding.model,
            "messages": messages,
            "max_tokens": decoding.max_tokens,
            "temperature": decoding.temperature,
            "top_p": decoding.top_p,
        }
        if decoding.seed is not None:
            kwargs["seed"] = decoding.seed
        if extra_body:
            kwargs["extra_body"] = extra_body
        return kwargs


def prompt_messages(messages: list[dict[str, str]], preference: str) -> list[dict[str, str]]:
    """The preference as the system message (before an existing one)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{preference}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": preference}, *messages]


def comparison_modes(
    kinds: Sequence[str],
    weights: Sequence[float | None],
    reward_models: Sequence[str],
    top_k: int | None = None,
    base_sees_preference: bool | None = None,
) -> list[Mode]:
    """The modes of a normal run: base/prompt modes, then PAD per reward
    model and weight."""
    modes: list[Mode] = []
    for kind in kinds:
        if kind == "pad":
            for reward_model in reward_models:
                for weight in weights:
                    modes.append(
                        Mode("pad", weight, top_k, None if reward_model == "self" else reward_model, base_sees_preference)
                    )
        else:
            modes.append(Mode(kind))
    return list(dict.fromkeys(modes))


def grid_modes(
    weights: Sequence[float], top_ks: Sequence[int], base_sees: Sequence[bool], reward_model: str = "self"
) -> list[Mode]:
    """base, prompt, and PAD over weights x top_k x base_sees_preference.

    With the `self` reward and base_sees_preference the base context equals
    the reward context, so the reward is 0 and every (w, k) decodes the same
    greedy answer (prompting with PAD's template): one setting stands for all."""
    rm = None if reward_model == "self" else reward_model
    modes = [Mode("base"), Mode("prompt")]
    for bsp in base_sees:
        if bsp and rm is None:
            modes.append(Mode("pad", weights[0], top_ks[0], rm, True))
            continue
        modes += [Mode("pad", w, k, rm, bsp) for k in top_ks for w in weights]
    return modes


# ---------------------------------------------------------------------- runs


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


def score(case: EvalCase, mode: Mode, text: str) -> tuple[bool, list[bool]]:
    results = [run_check(text, spec) for spec in case.checks]
    return all(results), results


async def answer_case(client, case: EvalCase, mode: Mode, decoding: Decoding) -> Answer:
    """One request. A failed request is recorded (error set) and counts as
    not satisfied, so every mode keeps the same cases."""
    start = time.perf_counter()
    try:
        response = await client.chat.completions.create(**mode.request(case, decoding))
    except Exception as exc:  # noqa: BLE001 - any failure is a result to report
        logger.warning("case %s, mode %s: %s", case.id, mode.name, exc)
        return Answer(case.id, case.preference_type, mode.name, "", False, [], None, None,
                      time.perf_counter() - start, f"{type(exc).__name__}: {exc}", asdict(decoding))
    choice = response.choices[0]
    text = choice.message.content or ""
    ok, results = score(case, mode, text)
    tokens = response.usage.completion_tokens if response.usage else None
    return Answer(case.id, case.preference_type, mode.name, text, ok, results, choice.finish_reason, tokens,
                  time.perf_counter() - start, None, asdict(decoding))


async def run_eval(
    client,
    cases: Sequence[EvalCase],
    modes: Sequence[Mode],
    decoding: Decoding,
    concurrency: int = 8,
    progress: bool = True,
    done: dict[tuple[str, str], Answer] | None = None,
    on_answer=None,
) -> list[Answer]:
    """Every (case, mode) answered once, `concurrency` requests in flight.
    `done` holds answers to reuse (resume); `on_answer` sees each new one.
    Returns answers in (mode, case) order."""
    from tqdm import tqdm

    done = dict(done or {})
    todo = [(case, mode) for case in cases for mode in modes if (case.id, mode.name) not in done]
    semaphore = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(todo), desc="eval", unit="answer", disable=not progress, dynamic_ncols=True)

    async def one(case: EvalCase, mode: Mode) -> None:
        async with semaphore:
            result = await answer_case(client, case, mode, decoding)
        done[(case.id, mode.name)] = result
        if on_answer is not None:
            on_answer(result)
        bar.update(1)
        bar.set_postfix_str(f"errors={sum(a.error is not None for a in done.values())}", refresh=False)

    try:
        await asyncio.gather(*(one(case, mode) for case, mode in todo))
    finally:
        bar.close()
    return [done[(case.id, mode.name)] for mode in modes for case in cases]


# ------------------------------------------------------------------- summary


def summarize(answers: Sequence[Answer], modes: Sequence[str], baseline: str = "prompt") -> dict[str, Any]:
    """Satisfaction per mode (overall and per preference type) with Wilson
    intervals, the fluency guard, and paired differences to `baseline`."""
    by_mode: dict[str, list[Answer]] = {m: [] for m in modes}
    for a in answers:
        by_mode.setdefault(a.mode, []).append(a)
    types = sorted({a.preference_type for a in answers})
    out: dict[str, Any] = {"types": types, "baseline": baseline, "modes": {}}
    base_answers = {a.case_id: a for a in by_mode.get(baseline, [])}
    for mode, items in by_mode.items():
        texts = [a.text for a in items if a.error is None]
        entry: dict[str, Any] = {
            OVERALL: rate([a.satisfied for a in items]).to_dict(),
            "by_type": {t: rate([a.satisfied for a in items if a.preference_type == t]).to_dict() for t in types},
            "repeated_4gram_share": mean_repeated_ngram_share(texts),
            "mean_words": mean_words(texts),
            "truncated": sum(a.finish_reason == "length" for a in items),
            "errors": sum(a.error is not None for a in items),
            "n": len(items),
        }
        if base_answers and mode != baseline:
            entry["vs_baseline"] = {}
            for t in [OVERALL, *types]:
                pairs = [(a.satisfied, base_answers[a.case_id].satisfied) for a in items
                         if a.case_id in base_answers and (t == OVERALL or a.preference_type == t)]
                diff, low, high = paired_bootstrap_diff([p[0] for p in pairs], [p[1] for p in pairs])
                entry["vs_baseline"][t] = {"diff": diff, "ci_low": low, "ci_high": high, "n": len(pairs)}
        out["modes"][mode] = entry
    return out


def _pct(r: dict[str, Any]) -> str:
    if not r["n"]:
        return "-"
    return f"{100 * r['rate']:.0f}% [{100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f}]"


def _diff(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "-"
    return f"{100 * d['diff']:+.0f} [{100 * d['ci_low']:+.0f}, {100 * d['ci_high']:+.0f}]"


def markdown_report(summary: dict[str, Any], title: str = "Satisfaction by preference type") -> str:
    modes = list(summary["modes"])
    types = summary["types"]
    lines = [f"### {title}", "", "Share of answers passing every check of their case, with Wilson 95% intervals.", ""]
    lines.append("| preference type | n | " + " | ".join(modes) + " |")
    lines.append("| --- | ---: |" + " ---: |" * len(modes))
    for t in [*types, OVERALL]:
        n = summary["modes"][modes[0]]["by_type"][t]["n"] if t != OVERALL else summary["modes"][modes[0]][OVERALL]["n"]
        cells = [_pct(summary["modes"][m]["by_type"][t] if t != OVERALL else summary["modes"][m][OVERALL]) for m in modes]
        label = f"**{t}**" if t == OVERALL else t
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "### Fluency guard", "",
              "| mode | repeated 4-gram share | mean words | truncated (max_tokens) | errors |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for m in modes:
        e = summary["modes"][m]
        lines.append(f"| {m} | {e['repeated_4gram_share']:.3f} | {e['mean_words']:.1f} | {e['truncated']} | {e['errors']} |")
    compared = [m for m in modes if "vs_baseline" in summary["modes"][m]]
    if compared:
        baseline = summary["baseline"]
        lines += ["", f"### Difference to `{baseline}` (percentage points, paired bootstrap 95% interval)", "",
                  "| preference type | " + " | ".join(compared) + " |", "| --- |" + " ---: |" * len(compared)]
        for t in [*types, OVERALL]:
            label = f"**{t}**" if t == OVERALL else t
            lines.append(f"| {label} | " + " | ".join(_diff(summary["modes"][m]["vs_baseline"][t]) for m in compared) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars: satisfaction by preference type (and overall), one bar
    per mode, Wilson 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary["modes"])
    groups = [*summary["types"], OVERALL]
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 2 + 0.22 * len(groups) * len(modes))), 5.0))
    for i, m in enumerate(modes):
        entries = [summary["modes"][m]["by_type"][g] if g != OVERALL else summary["modes"][m][OVERALL] for g in groups]
        values = [100 * e["rate"] if e["n"] else 0 for e in entries]
        lower = [max(0.0, 100 * (e["rate"] - e["ci_low"])) if e["n"] else 0 for e in entries]
        upper = [max(0.0, 100 * (e["ci_high"] - e["rate"])) if e["n"] else 0 for e in entries]
        xs = [g + (i - (len(modes) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=m, yerr=[lower, upper], capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel("answers satisfying the preference (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- grid


def choose_best(summary: dict[str, Any], baseline: str = "prompt", factor: float = FLUENCY_FACTOR) -> dict[str, Any]:
    """The grid rule: among PAD settings whose repeated-4-gram share is at
    most `factor` x the baseline's, the highest overall satisfaction (ties:
    lower repetition, then lower weight). Returns rows for every setting."""
    limit = factor * summary["modes"][baseline]["repeated_4gram_share"]
    rows = []
    for name, e in summary["modes"].items():
        if not name.startswith("pad"):
            continue
        rows.append({
            "mode": name,
            "satisfaction": e[OVERALL],
            "repeated_4gram_share": e["repeated_4gram_share"],
            "mean_words": e["mean_words"],
            "eligible": e["repeated_4gram_share"] <= limit,
            "vs_baseline": e.get("vs_baseline", {}).get(OVERALL),
        })
    eligible = [r for r in rows if r["eligible"]]

    def weight_of(name: str) -> float:
        for part in name.split():
            if part.startswith("w="):
                return float(part[2:])
        return 0.0

    best = max(eligible, key=lambda r: (r["satisfaction"]["rate"], -r["repeated_4gram_share"], -weight_of(r["mode"])),
               default=None)
    base = summary["modes"][baseline][OVERALL]
    return {
        "baseline": baseline,
        "baseline_satisfaction": base,
        "baseline_repeated_4gram_share": summary["modes"][baseline]["repeated_4gram_share"],
        "repetition_limit": limit,
        "rows": rows,
        "best": best["mode"] if best else None,
        "best_at_least_baseline": bool(best and best["satisfaction"]["rate"] >= base["rate"]),
    }


def grid_markdown(choice: dict[str, Any]) -> str:
    lines = [
        "### PAD settings grid",
        "",
        f"`{choice['baseline']}`: {_pct(choice['baseline_satisfaction'])}, repeated 4-gram share "
        f"{choice['baseline_repeated_4gram_share']:.3f}; a setting is eligible when its share is at most "
        f"{FLUENCY_FACTOR:g}x that ({choice['repetition_limit']:.3f}).",
        "",
        f"| setting | satisfaction | vs {choice['baseline']} (pts) | repeated 4-gram share | mean words | eligible |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in sorted(choice["rows"], key=lambda r: -r["satisfaction"]["rate"]):
        mark = "**" if r["mode"] == choice["best"] else ""
        diff = _diff(r["vs_baseline"]) if r["vs_baseline"] else "-"
        lines.append(
            f"| {mark}{r['mode']}{mark} | {_pct(r['satisfaction'])} | {diff} | {r['repeated_4gram_share']:.3f} | "
            f"{r['mean_words']:.1f} | {'yes' if r['eligible'] else 'no'} |"
        )
    lines.append("")
    if choice["best"]:
        verdict = "at least as good as" if choice["best_at_least_baseline"] else "WORSE than"
        lines.append(f"Best eligible setting: **{choice['best']}**, {verdict} `{choice['baseline']}` overall.")
        settings = dict(part.split("=", 1) for part in choice["best"].split() if "=" in part)
        env = " ".join(f"{var}={settings[key]}" for key, var in (("w", "PAD_DEFAULT_WEIGHT"), ("k", "PAD_DEFAULT_TOP_K"))
                       if key in settings)
        if env:
            lines.append(f"As server defaults: `{env}`" + (
                " (and `pad.base_sees_preference: true` per request)." if settings.get("bsp") == "1" else "."))
    else:
        lines.append("No PAD setting stays within the repetition limit.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- I/O


def load_done(path: Path, decoding: Decoding) -> dict[tuple[str, str], Answer]:
    """Answers of an earlier run with the same decoding settings (resume);
    failed requests are retried."""
    done: dict[tuple[str, str], Answer] = {}
    if not path.exists():
        return done
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        try:
            answer = Answer(**json.loads(raw))
        except (json.JSONDecodeError, TypeError):
            continue
        if answer.error is None and answer.decoding == asdict(decoding):
            done[(answer.case_id, answer.mode)] = answer
    return done


def write_outputs(out_dir: Path, answers: Sequence[Answer], summary: dict[str, Any], settings: dict[str, Any],
                  markdown: str, chart_title: str, choice: dict[str, Any] | None = None,
                  chart_summary: dict[str, Any] | None = None) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"answers": out_dir / "answers.json", "report": out_dir / "report.md", "chart": out_dir / "chart.png"}
    payload = {"settings": settings, "summary": summary, "answers": [asdict(a) for a in answers]}
    if choice is not None:
        payload["grid"] = choice
    paths["answers"].write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")
    paths["report"].write_text(markdown, encoding="utf-8")
    plot_summary(chart_summary or summary, paths["chart"], chart_title)
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------- CLI


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def weights(text: str) -> list[float | None]:
    """Comma list of weights; `default` leaves the weight to the server."""
    try:
        return [None if x.strip() == "default" else float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"weights: {exc}") from exc


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def bools(text: str) -> list[bool]:
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    try:
        return [table[x.strip().lower()] for x in text.split(",") if x.strip()]
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"not a boolean: {exc}") from exc


def optional_bool(text: str) -> bool:
    (value,) = bools(text)
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pad eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default=str(DEFAULT_DATASET), help="JSONL data set (default: data/eval/dev.jsonl)")
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                        "(default: start `pad serve` on a free local port)")
    parser.add_argument("--api-key", default="none", help="sent as the bearer token (default: 'none'; env OPENAI_API_KEY not used)")
    parser.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    parser.add_argument("--modes", default="base,prompt,pad", help="comma list of base, prompt, prompt-template, pad (default: base,prompt,pad)")
    parser.add_argument("--weights", type=weights, default=[1.0, 2.0, 4.0],
                        help="PAD guidance weights, one mode each; 'default' = the server's (default: 1,2,4)")
    parser.add_argument("--reward-model", action="append", dest="reward_models", metavar="NAME",
                        help="PAD reward model(s) to compare (repeatable; default: self). 'self' plus a trained "
                        "adapter: --reward-model self --reward-model concise")
    parser.add_argument("--top-k", type=int, help="PAD candidates (default: the server's)")
    parser.add_argument("--base-sees-preference", type=optional_bool, metavar="true|false",
                        help="PAD: does the base context see the preference (default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=128, help="(default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="(default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per request (default: 900)")
    parser.add_argument("--types", help="comma list of preference types to keep")
    parser.add_argument("--ids", help="comma list of case ids to keep")
    parser.add_argument("--limit", type=int, help="keep the first N cases of each preference type")
    parser.add_argument("--out", default="eval-results", help="output folder: answers.json, answers.jsonl, report.md, chart.png (default: eval-results)")
    parser.add_argument("--resume", action="store_true", help="reuse answers in OUT/answers.jsonl from an earlier run")
    parser.add_argument("--grid", action="store_true", help="sweep PAD settings and pick the best (see --grid-*)")
    parser.add_argument("--grid-weights", type=floats, default=[1.0, 2.0, 4.0], help="(default: 1,2,4)")
    parser.add_argument("--grid-top-k", type=ints, default=[5, 10, 20], help="(default: 5,10,20)")
    parser.add_argument("--grid-base-sees-preference", type=bools, default=[False, True], help="(default: false,true)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the local `pad serve` (repeatable; no --base-url only)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def resolve_model(client, model: str | None) -> str:
    if model:
        return model
    listing = await client.models.list()
    if not listing.data:
        raise RuntimeError("the endpoint lists no models; pass --model")
    return listing.data[0].id


async def evaluate(args: argparse.Namespace, base_url: str) -> int:
    from openai import AsyncOpenAI

    cases = select_cases(
        load_cases(args.dataset),
        types=args.types.split(",") if args.types else None,
        ids=args.ids.split(",") if args.ids else None,
        limit=args.limit,
    )
    if not cases:
        print("pad eval: no cases selected", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncOpenAI(base_url=base_url, api_key=args.api_key, timeout=args.timeout, max_retries=1) as client:
        decoding = Decoding(await resolve_model(client, args.model), args.max_tokens, args.temperature, args.top_p, args.seed)
        if args.grid:
            modes = grid_modes(args.grid_weights, args.grid_top_k, args.grid_base_sees_preference,
                               (args.reward_models or ["self"])[0])
        else:
            kinds = [k.strip() for k in args.modes.split(",") if k.strip()]
            unknown = set(kinds) - {"base", "prompt", "prompt-template", "pad"}
            if unknown:
                print(f"pad eval: unknown mode(s) {sorted(unknown)}", file=sys.stderr)
                return 2
            modes = comparison_modes(kinds, args.weights, args.reward_models or ["self"], args.top_k,
                                     args.base_sees_preference)
        journal = out_dir / "answers.jsonl"
        done = load_done(journal, decoding) if args.resume else {}
        wanted = {m.name for m in modes}
        done = {k: v for k, v in done.items() if k[1] in wanted}
        logger.info("%d cases x %d modes (%d reused) against %s, model %s", len(cases), len(modes), len(done),
                    base_url, decoding.model)
        with journal.open("a" if args.resume else "w", encoding="utf-8") as handle:

            def record(answer: Answer) -> None:
                handle.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")
                handle.flush()

            start = time.perf_counter()
            answers = await run_eval(client, cases, modes, decoding, args.concurrency, not args.no_progress, done, record)
            elapsed = time.perf_counter() - start
    names = [m.name for m in modes]
    baseline = "prompt" if "prompt" in names else names[0]
    summary = summarize(answers, names, baseline)
    settings = {
        "dataset": str(args.dataset), "base_url": base_url, "cases": len(cases), "modes": names,
        "decoding": asdict(decoding), "seconds": round(elapsed, 1),
    }
    header = (f"Model `{decoding.model}`, {len(cases)} cases, max_tokens={decoding.max_tokens}, "
              f"temperature={decoding.temperature:g}, seed={decoding.seed}.\n\n")
    choice = None
    if args.grid:
        choice = choose_best(summary, baseline)
        shown = ["base", "prompt"] + ([choice["best"]] if choice["best"] else [])
        best_summary = summarize([a for a in answers if a.mode in shown], shown, baseline)
        markdown = header + grid_markdown(choice) + "\n" + markdown_report(best_summary, "Best setting by preference type")
        paths = write_outputs(out_dir, answers, summary, settings, markdown,
                              f"pad eval ({decoding.model}): base, prompt, best PAD setting", choice, best_summary)
    else:
        markdown = header + markdown_report(summary)
        paths = write_outputs(out_dir, answers, summary, settings, markdown, f"pad eval ({decoding.model})")
    sys.stdout.write(markdown + "\n")
    sys.stdout.write(json.dumps({"outputs": paths, "seconds": round(elapsed, 1)}) + "\n")
    errors = sum(a.error is not None for a in answers)
    if errors:
        print(f"pad eval: {errors} request(s) failed (counted as not satisfied); see {paths['answers']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        load_cases(args.dataset)  # validate before starting anything
    except (DatasetError, OSError) as exc:
        print(f"pad eval: {exc}", file=sys.stderr)
        return 2
    if args.base_url:
        return asyncio.run(evaluate(args, args.base_url))
    from server.tools.local_server import local_server

    with local_server(args.serve_arg) as base_url:
        return asyncio.run(evaluate(args, base_url))


if __name__ == "__main__":
    raise SystemExit(main())
