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
                   per --weights value and per --reward-model name

and judges every answer twice: the case's preference checks (raw
satisfaction) and the quality gate (pad_core/evaluation/quality.py: right
language, real words, on topic, no leakage, not a loop, coherent). The
headline is gated satisfaction: both pass. Reports per mode and preference
type with Wilson 95% intervals, differences to `prompt` with paired-bootstrap
intervals, ten answers per mode for the same seeded cases, a JSON file with
every answer and its gate, a Markdown report and a PNG chart
(pad_core/evaluation/report.py).

`--grid` instead sweeps PAD settings (weights x top_k x min_p x
base_sees_preference) and picks the best gated satisfaction among settings
whose gate pass rate is at least prompt's minus 5 points (the rule for the
server defaults).

Coherence (the gate's model-based part) is scored in-process with the
embedded model after the answers are in (`--no-coherence` skips it).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pad_core.evaluation.checks import run_check
from pad_core.evaluation.dataset import SPLITS, DatasetError, EvalCase, load_cases, select_cases
from pad_core.evaluation.quality import QualityGate, coherence_floor
from pad_core.evaluation.report import (
    Answer,
    choose_best,
    grid_markdown,
    markdown_report,
    plot_summary,
    samples_markdown,
    summarize,
)
from pad_core.prompting import with_preference
from pad_core.settings import DEFAULT_PREFERENCE_TEMPLATE

logger = logging.getLogger(__name__)

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "data" / "eval" / "dev.jsonl"
SAMPLE_CASES = 10  # answers shown per mode in the report, for cases drawn with --sample-seed


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
    min_p: float | None = None

    @property
    def name(self) -> str:
        if self.kind != "pad":
            return self.kind
        parts = ["pad" if self.reward_model in (None, "self") else f"pad[{self.reward_model}]"]
        if self.weight is not None:
            parts.append(f"w={self.weight:g}")
        if self.top_k is not None:
            parts.append(f"k={self.top_k}")
        if self.min_p is not None:
            parts.append(f"p={self.min_p:g}")
        if self.base_sees_preference is not None:
            parts.append(f"bsp={int(self.base_sees_preference)}")
        return " ".join(parts)

    def pad_body(self) -> dict[str, Any]:
        fields = {
            "weight": self.weight,
            "top_k": self.top_k,
            "min_p": self.min_p,
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
    min_p: float | None = None,
) -> list[Mode]:
    """The modes of a normal run: base/prompt modes, then PAD per reward
    model and weight."""
    modes: list[Mode] = []
    for kind in kinds:
        if kind == "pad":
            for reward_model in reward_models:
                for weight in weights:
                    modes.append(
                        Mode("pad", weight, top_k, None if reward_model == "self" else reward_model, base_sees_preference,
                             min_p)
                    )
        else:
            modes.append(Mode(kind))
    return list(dict.fromkeys(modes))


def grid_modes(
    weights: Sequence[float], top_ks: Sequence[int], base_sees: Sequence[bool], reward_model: str = "self",
    min_ps: Sequence[float | None] = (None,),
) -> list[Mode]:
    """base, prompt, and PAD over weights x top_k x min_p x base_sees_preference
    (min_p None: the server's default, left out of the mode's name).

    With the `self` reward and base_sees_preference the base context equals
    the reward context, so the reward is 0 and every (w, k, min_p) decodes the
    same greedy answer (prompting with PAD's template): one setting stands for all."""
    rm = None if reward_model == "self" else reward_model
    modes = [Mode("base"), Mode("prompt")]
    for bsp in base_sees:
        if bsp and rm is None:
            modes.append(Mode("pad", weights[0], top_ks[0], rm, True, min_ps[0]))
            continue
        modes += [Mode("pad", w, k, rm, bsp, p) for p in min_ps for k in top_ks for w in weights]
    return modes


# ---------------------------------------------------------------------- runs


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


# ---------------------------------------------------------------------- gate


def score_coherence(answers: Sequence[Answer], cases: Sequence[EvalCase], model: str) -> dict[tuple[str, str], float | None]:
    """(case id, mode) -> the answer's mean token log-probability under `model`,
    given the question with the preference as a system message. Equal texts
    of the same case are scored once."""
    from pad_core.evaluation.coherence import CoherenceScorer, ScoringItem

    by_id = {case.id: case for case in cases}
    live = [a for a in answers if a.error is None and a.case_id in by_id]
    unique = list(dict.fromkeys((a.case_id, a.text) for a in live))
    items = [
        ScoringItem(tuple((m["role"], m["content"]) for m in prompt_messages(by_id[cid].messages, by_id[cid].preference)),
                    text)
        for cid, text in unique
    ]
    logger.info("scoring coherence of %d distinct answers with %s", len(items), model)
    scores = dict(zip(unique, CoherenceScorer.load(model).score(items), strict=True))
    return {(a.case_id, a.mode): scores[(a.case_id, a.text)] for a in live}


def gate_answers(answers: Sequence[Answer], cases: Sequence[EvalCase], gate: QualityGate,
                 coherence: dict[tuple[str, str], float | None] | None = None, baseline: str = "prompt") -> float | None:
    """Sets every answer's `gate` (None for failed requests). The coherence
    floor comes from the baseline mode's answers; returns it (None: coherence
    not judged, because it was not scored or there is no baseline mode)."""
    by_id = {case.id: case for case in cases}
    coherence = coherence or {}
    floor = coherence_floor([coherence.get((a.case_id, a.mode)) for a in answers if a.mode == baseline])
    for a in answers:
        if a.error is not None or a.case_id not in by_id:
            a.gate = None
            continue
        case = by_id[a.case_id]
        a.gate = gate.check(
            a.text, language=case.language, topic=case.topic, preference=case.preference,
            coherence_logprob=coherence.get((a.case_id, a.mode)), coherence_floor=floor,
        ).to_dict()
    return floor


# ----------------------------------------------------------------------- I/O


def read_journal(path: Path) -> list[Answer]:
    """Every well-formed answer of a journal (answers.jsonl), later lines
    replacing earlier ones for the same (case, mode)."""
    answers: dict[tuple[str, str], Answer] = {}
    if not path.exists():
        return []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        try:
            answer = Answer(**json.loads(raw))
        except (json.JSONDecodeError, TypeError):
            continue
        answers[(answer.case_id, answer.mode)] = answer
    return list(answers.values())


def load_done(path: Path, decoding: Decoding) -> dict[tuple[str, str], Answer]:
    """Answers of an earlier run with the same decoding settings (resume);
    failed requests are retried."""
    return {(a.case_id, a.mode): a for a in read_journal(path)
            if a.error is None and a.decoding == asdict(decoding)}


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
    parser.add_argument("--min-p", type=float, help="PAD prescreen floor pad.min_p (default: the server's)")
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
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="cases to use: all, tune (first half of each preference type) or heldout (the rest) "
                        "(default: all)")
    parser.add_argument("--limit", type=int, help="keep the first N cases of each preference type")
    parser.add_argument("--out", default="eval-results", help="output folder: answers.json, answers.jsonl, report.md, chart.png (default: eval-results)")
    parser.add_argument("--resume", action="store_true", help="reuse answers in OUT/answers.jsonl from an earlier run")
    parser.add_argument("--rescore", action="store_true",
                        help="ask nothing: judge the answers already in OUT/answers.jsonl again (gate, report) "
                        "for the selected cases; no endpoint needed")
    parser.add_argument("--no-coherence", dest="coherence", action="store_false",
                        help="do not score coherence (the gate then judges the other components only)")
    parser.add_argument("--coherence-model", default="embedded",
                        help="model that scores coherence in-process ('embedded', a folder or a .gguf; default: embedded)")
    parser.add_argument("--sample-seed", type=int, default=0,
                        help=f"seed that draws the {SAMPLE_CASES} cases whose answers the report shows (default: 0)")
    parser.add_argument("--grid", action="store_true", help="sweep PAD settings and pick the best (see --grid-*)")
    parser.add_argument("--grid-weights", type=floats, default=[1.0, 2.0, 4.0], help="(default: 1,2,4)")
    parser.add_argument("--grid-top-k", type=ints, default=[5, 10, 20], help="(default: 5,10,20)")
    parser.add_argument("--grid-min-p", type=floats, default=None,
                        help="prescreen floors to sweep, e.g. 0,0.05,0.1 (default: the server's only)")
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


def selected_cases(args: argparse.Namespace) -> list[EvalCase]:
    return select_cases(
        load_cases(args.dataset),
        types=args.types.split(",") if args.types else None,
        ids=args.ids.split(",") if args.ids else None,
        limit=args.limit,
        split=args.split,
    )


def requested_modes(args: argparse.Namespace) -> list[Mode]:
    if args.grid:
        return grid_modes(args.grid_weights, args.grid_top_k, args.grid_base_sees_preference,
                          (args.reward_models or ["self"])[0], args.grid_min_p or [None])
    kinds = [k.strip() for k in args.modes.split(",") if k.strip()]
    unknown = set(kinds) - {"base", "prompt", "prompt-template", "pad"}
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}")
    return comparison_modes(kinds, args.weights, args.reward_models or ["self"], args.top_k,
                            args.base_sees_preference, args.min_p)


async def collect(args: argparse.Namespace, base_url: str, cases: list[EvalCase], modes: list[Mode],
                  out_dir: Path) -> tuple[list[Answer], Decoding]:
    """Asks the endpoint for every (case, mode) not already in the journal."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key=args.api_key, timeout=args.timeout, max_retries=1) as client:
        decoding = Decoding(await resolve_model(client, args.model), args.max_tokens, args.temperature, args.top_p, args.seed)
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

            answers = await run_eval(client, cases, modes, decoding, args.concurrency, not args.no_progress, done, record)
    return answers, decoding


def report(args: argparse.Namespace, cases: list[EvalCase], names: list[str], answers: list[Answer],
           decoding: dict[str, Any], settings: dict[str, Any], out_dir: Path) -> int:
    """Gates every answer, then writes and prints the report. Exit code 1 if
    any request failed."""
    baseline = "prompt" if "prompt" in names else names[0]
    coherence = score_coherence(answers, cases, args.coherence_model) if args.coherence else None
    floor = gate_answers(answers, cases, QualityGate(), coherence, baseline)
    summary = summarize(answers, names, baseline)
    settings = {**settings, "coherence_model": args.coherence_model if coherence else None, "coherence_floor": floor}
    floor_text = (f"coherence floor {floor:.2f} nats/token (`{baseline}` median minus the margin)"
                  if floor is not None else "coherence not judged")
    header = (f"Model `{decoding['model']}`, {len(cases)} cases (split: {args.split}), "
              f"max_tokens={decoding['max_tokens']}, temperature={decoding['temperature']:g}, "
              f"seed={decoding['seed']}; {floor_text}.\n\n")
    questions = {c.id: (c.messages[-1]["content"], c.preference) for c in cases}
    choice = None
    if args.grid:
        choice = choose_best(summary, baseline)
        shown = [m for m in ("base", baseline) if m in names] + ([choice["best"]] if choice["best"] else [])
        shown_answers = [a for a in answers if a.mode in shown]
        best_summary = summarize(shown_answers, shown, baseline)
        markdown = (header + grid_markdown(choice) + "\n" + markdown_report(best_summary, "Best setting by preference type")
                    + "\n" + samples_markdown(shown_answers, shown, questions, SAMPLE_CASES, args.sample_seed))
        paths = write_outputs(out_dir, answers, summary, settings, markdown,
                              f"pad eval ({decoding['model']}): gated satisfaction, best PAD setting", choice,
                              best_summary)
    else:
        markdown = (header + markdown_report(summary) + "\n"
                    + samples_markdown(answers, names, questions, SAMPLE_CASES, args.sample_seed))
        paths = write_outputs(out_dir, answers, summary, settings, markdown,
                              f"pad eval ({decoding['model']}): gated satisfaction")
    sys.stdout.write(markdown + "\n")
    sys.stdout.write(json.dumps({"outputs": paths, "seconds": settings.get("seconds")}) + "\n")
    errors = sum(a.error is not None for a in answers)
    if errors:
        print(f"pad eval: {errors} request(s) failed (counted as not satisfied); see {paths['answers']}", file=sys.stderr)
        return 1
    return 0


async def evaluate(args: argparse.Namespace, base_url: str) -> int:
    cases = selected_cases(args)
    if not cases:
        print("pad eval: no cases selected", file=sys.stderr)
        return 2
    modes = requested_modes(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    answers, decoding = await collect(args, base_url, cases, modes, out_dir)
    names = [m.name for m in modes]
    settings = {
        "dataset": str(args.dataset), "base_url": base_url, "cases": len(cases), "split": args.split, "modes": names,
        "decoding": asdict(decoding), "seconds": round(time.perf_counter() - start, 1),
    }
    return report(args, cases, names, answers, asdict(decoding), settings, out_dir)


def rescore(args: argparse.Namespace) -> int:
    """Judges a finished run again (a new gate, another split) without asking
    anything: the modes are those in the journal, in their first order."""
    out_dir = Path(args.out)
    cases = selected_cases(args)
    wanted = {c.id for c in cases}
    answers = [a for a in read_journal(out_dir / "answers.jsonl") if a.case_id in wanted]
    if not answers:
        print(f"pad eval: no answers for the selected cases in {out_dir / 'answers.jsonl'}", file=sys.stderr)
        return 2
    names = list(dict.fromkeys(a.mode for a in answers))
    # A mode that did not answer every selected case (an interrupted run)
    # cannot be compared case for case: leave it out, saying so.
    answered = {name: {a.case_id for a in answers if a.mode == name} for name in names}
    complete = {c.id for c in cases}
    partial = [name for name in names if answered[name] != complete & {a.case_id for a in answers}]
    if partial:
        logger.warning("left out, not every case answered: %s", ", ".join(partial))
        names = [n for n in names if n not in partial]
        answers = [a for a in answers if a.mode in names]
    if args.grid is False and args.modes != "base,prompt,pad":
        kinds = {k.strip() for k in args.modes.split(",")}
        names = [n for n in names if n.split()[0].split("[")[0] in kinds]
        answers = [a for a in answers if a.mode in names]
    decoding = answers[0].decoding or {"model": "?", "max_tokens": 0, "temperature": 0.0, "seed": None}
    cases = [c for c in cases if c.id in {a.case_id for a in answers}]
    settings = {"dataset": str(args.dataset), "rescored_from": str(out_dir / "answers.jsonl"), "cases": len(cases),
                "split": args.split, "modes": names, "decoding": decoding}
    return report(args, cases, names, answers, decoding, settings, out_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        load_cases(args.dataset)  # validate before starting anything
        requested_modes(args)
    except (DatasetError, OSError, ValueError) as exc:
        print(f"pad eval: {exc}", file=sys.stderr)
        return 2
    if args.rescore:
        return rescore(args)
    if args.base_url:
        return asyncio.run(evaluate(args, args.base_url))
    from server.tools.local_server import local_server

    with local_server(args.serve_arg) as base_url:
        return asyncio.run(evaluate(args, args.base_url or base_url))


if __name__ == "__main__":
    raise SystemExit(main())
