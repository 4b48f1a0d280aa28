"""`pad bench`: how fast is an OpenAI-compatible endpoint, plain vs PAD?

A load generator over HTTP (the official `openai` async client, streaming):
at each concurrency level (default 1, 4, 16, 32) it sends a fixed set of
prompts, first with plain decoding, then with PAD (the `preference` body
field: one or several preferences per request), and measures

  requests/s, generated tokens/s (usage.completion_tokens, else one token
  per streamed chunk), time to first token (TTFT) and inter-token latency
  (ITL: gaps between streamed chunks) at p50/p95/p99, errors;

prints a table per mode and level and the PAD/plain ratio at each level,
and writes bench.json, bench.md and bench.png. Answers may stop before
--max-tokens (plain and PAD answers differ in length), so compare the
per-token numbers (tokens/s, ITL), or pass `--ignore-eos`: it sends vLLM's
`ignore_eos` extension (honoured by the PAD server and by vLLM), so every
answer runs to --max-tokens.

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

from pad_core.evaluation.stats import mean, percentile

logger = logging.getLogger(__name__)

PROMPTS = [
    "How do I sleep better?",
    "What is a good way to save money each month?",
    "Explain how a rainbow forms.",
    "Give me tips for my first job interview.",
    "How do I make a simple tomato sauce?",
    "Why do cats purr?",
    "What should I pack for a weekend hiking trip?",
    "How can I stay focused while studying?",
    "What are the benefits of drinking water?",
    "How do I start learning to play the guitar?",
    "What is the difference between weather and climate?",
    "How do I keep my houseplants alive?",
    "What is a fun thing to do on a rainy day?",
    "How does a refrigerator keep food cold?",
    "What should I look for when buying a used bike?",
    "How can I make new friends in a new city?",
]
PREFERENCES = [
    "I like short answers with a bit of humour",
    "Please format your answers as a bulleted list",
    "Always end your answer with a question for me",
]


@dataclass(frozen=True)
class BenchMode:
    name: str
    preferences: tuple[str, ...] = ()
    weight: float | None = None
    top_k: int | None = None

    def extra_body(self, ignore_eos: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.preferences:
            body["preference"] = (
                self.preferences[0] if len(self.preferences) == 1 else [{"text": p, "weight": 1.0} for p in self.preferences]
            )
            pad = {k: v for k, v in (("weight", self.weight), ("top_k", self.top_k)) if v is not None}
            if pad:
                body["pad"] = pad
        if ignore_eos:
            body["ignore_eos"] = True
        return body


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    completion_tokens: int
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    tpot_ms: float
    error_samples: list[str] = field(default_factory=list)


def bench_modes(preferences: Sequence[str], counts: Sequence[int], weight: float | None, top_k: int | None) -> list[BenchMode]:
    modes = [BenchMode("plain")]
    for count in counts:
        if not 1 <= count <= len(preferences):
            raise ValueError(f"--pad-preferences {count}: need between 1 and {len(preferences)} preferences")
        name = "pad" if list(counts) == [1] else f"pad x{count}"
        modes.append(BenchMode(name, tuple(preferences[:count]), weight, top_k))
    return modes


async def one_request(client, model: str, prompt: str, mode: BenchMode, max_tokens: int, ignore_eos: bool) -> RequestResult:
    start = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    try:
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body = mode.extra_body(ignore_eos)
        if body:
            kwargs["extra_body"] = body
        stream = await client.chat.completions.create(**kwargs)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if getattr(chunk, "usage", None) is not None:
                usage_tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - counted and reported
        return RequestResult(False, start, time.perf_counter(), error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    tokens = usage_tokens if usage_tokens is not None else len(stamps)
    return RequestResult(True, start, end, stamps[0] - start if stamps else None, gaps, tokens)


def summarize_level(mode: str, concurrency: int, results: Sequence[RequestResult], seconds: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tpots = [(r.end - r.start - r.ttft) / (r.tokens - 1) for r in ok if r.ttft is not None and r.tokens > 1]
    tokens = sum(r.tokens for r in ok)

    def pcts(values: Sequence[float]) -> dict[str, float]:
        return {f"p{q}": 1000 * percentile(values, q) for q in (50, 95, 99)}

    return LevelResult(
        mode=mode,
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        seconds=seconds,
        requests_per_s=len(ok) / seconds if seconds else 0.0,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        completion_tokens=tokens,
        ttft_ms=pcts(ttfts),
        itl_ms=pcts(gaps),
        tpot_ms=1000 * mean(tpots),
        error_samples=sorted({r.error for r in results if r.error})[:3],
    )


async def run_level(client, model: str, mode: BenchMode, concurrency: int, requests: int, max_tokens: int,
                    ignore_eos: bool, prompts: Sequence[str] = PROMPTS) -> LevelResult:
    """`requests` requests, `concurrency` of them in flight at all times."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    results: list[RequestResult] = []

    async def worker() -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one_request(client, model, prompts[index % len(prompts)], mode, max_tokens, ignore_eos))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return summarize_level(mode.name, concurrency, results, time.perf_counter() - start)


def ratio_rows(levels: Sequence[LevelResult]) -> list[dict[str, Any]]:
    """PAD/plain at each concurrency level, for each PAD mode."""
    plain = {lv.concurrency: lv for lv in levels if lv.mode == "plain"}
    rows = []
    for lv in levels:
        base = plain.get(lv.concurrency)
        if lv.mode == "plain" or base is None:
            continue

        def r(a: float, b: float) -> float:
            return a / b if b else float("nan")

        rows.append({
            "mode": lv.mode,
            "concurrency": lv.concurrency,
            "requests_per_s": r(lv.requests_per_s, base.requests_per_s),
            "tokens_per_s": r(lv.tokens_per_s, base.tokens_per_s),
            "ttft_p50": r(lv.ttft_ms["p50"], base.ttft_ms["p50"]),
            "itl_p50": r(lv.itl_ms["p50"], base.itl_ms["p50"]),
        })
    return rows


def markdown_tables(levels: Sequence[LevelResult], ratios: Sequence[dict[str, Any]]) -> str:
    def ms(d: dict[str, float]) -> str:
        return " / ".join(f"{d[k]:.0f}" for k in ("p50", "p95", "p99"))

    lines = [
        "| mode | concurrency | requests | errors | req/s | tok/s | TTFT p50/p95/p99 (ms) | ITL p50/p95/p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in levels:
        lines.append(f"| {lv.mode} | {lv.concurrency} | {lv.requests} | {lv.errors} | {lv.requests_per_s:.2f} | "
                     f"{lv.tokens_per_s:.1f} | {ms(lv.ttft_ms)} | {ms(lv.itl_ms)} |")
    if ratios:
        lines += ["", "PAD / plain at each level (throughput: higher is better; latency: lower is better):", "",
                  "| mode | concurrency | req/s | tok/s | TTFT p50 | ITL p50 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in ratios:
            lines.append(f"| {row['mode']} | {row['concurrency']} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.2f} | "
                         f"{row['ttft_p50']:.2f} | {row['itl_p50']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_levels(levels: Sequence[LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(lv.mode for lv in levels))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [
        ("generated tokens/s", lambda lv: lv.tokens_per_s, False),
        ("TTFT p50 (ms)", lambda lv: lv.ttft_ms["p50"], True),
        ("inter-token latency p50 (ms)", lambda lv: lv.itl_ms["p50"], True),
    ]
    for ax, (label, value, log) in zip(axes, panels):
        for mode in modes:
            points = sorted((lv.concurrency, value(lv)) for lv in levels if lv.mode == mode)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ticks = sorted({lv.concurrency for lv in levels})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent requests")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pad bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                        "(default: start `pad serve` on a free local port)")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    parser.add_argument("--concurrency", type=ints, default=[1, 4, 16, 32], help="comma list of levels (default: 1,4,16,32)")
    parser.add_argument("--requests", type=int, help="requests per mode and level (default: max(8, 2 x level))")
    parser.add_argument("--max-tokens", type=int, default=64, help="(default: 64)")
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM extension, honoured by pad serve)")
    parser.add_argument("--modes", default="plain,pad", help="plain, pad or both (default: plain,pad)")
    parser.add_argument("--preference", action="append", dest="preferences", metavar="TEXT",
                        help=f"PAD preference (repeatable; default: {PREFERENCES!r})")
    parser.add_argument("--pad-preferences", type=ints, default=[1],
                        help="preferences per PAD request, one PAD mode each, e.g. 1,3 (default: 1)")
    parser.add_argument("--weight", type=float, help="PAD weight (default: the server's)")
    parser.add_argument("--top-k", type=int, help="PAD top_k (default: the server's)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests per mode first (default: 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md, bench.png (default: bench-results)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the local `pad serve` (no --base-url only)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def bench(args: argparse.Namespace, base_url: str) -> int:
    from openai import AsyncOpenAI

    from server.tools.eval import resolve_model

    kinds = [k.strip() for k in args.modes.split(",") if k.strip()]
    modes = bench_modes(args.preferences or PREFERENCES, args.pad_preferences, args.weight, args.top_k)
    modes = [m for m in modes if (m.name == "plain" and "plain" in kinds) or (m.name != "plain" and "pad" in kinds)]
    levels: list[LevelResult] = []
    async with AsyncOpenAI(base_url=base_url, api_key=args.api_key, timeout=args.timeout, max_retries=0) as client:
        model = await resolve_model(client, args.model)
        for mode in modes:
            for i in range(args.warmup):
                await one_request(client, model, PROMPTS[i % len(PROMPTS)], mode, args.max_tokens, args.ignore_eos)
        for concurrency in args.concurrency:
            for mode in modes:
                count = args.requests or max(8, 2 * concurrency)
                result = await run_level(client, model, mode, concurrency, count, args.max_tokens, args.ignore_eos)
                logger.warning("%s at %d: %.1f tok/s, %d errors", mode.name, concurrency, result.tokens_per_s, result.errors)
                levels.append(result)
    ratios = ratio_rows(levels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"base_url": base_url, "model": model, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
                "modes": [asdict(m) for m in modes], "prompts": PROMPTS}
    (out / "bench.json").write_text(json.dumps({"settings": settings, "levels": [asdict(lv) for lv in levels],
                                                "ratios": ratios}, indent=1), encoding="utf-8")
    plot_levels(levels, out / "bench.png", f"pad bench ({model}, max_tokens={args.max_tokens})")
    markdown = markdown_tables(levels, ratios)
    (out / "bench.md").write_text(markdown, encoding="utf-8")
    sys.stdout.write(markdown + "\n" + json.dumps({"outputs": [str(out / n) for n in ("bench.json", "bench.md", "bench.png")]}) + "\n")
    return 1 if any(lv.errors for lv in levels) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        bench_modes(args.preferences or PREFERENCES, args.pad_preferences, args.weight, args.top_k)
    except ValueError as exc:
        print(f"pad bench: {exc}", file=sys.stderr)
        return 2
    if args.base_url:
        return asyncio.run(bench(args, args.base_url))
    from server.tools.local_server import local_server

    with local_server(args.serve_arg) as base_url:
        return asyncio.run(bench(args, base_url))


if __name__ == "__main__":
    raise SystemExit(main())
