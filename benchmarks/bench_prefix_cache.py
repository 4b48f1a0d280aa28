"""Time to first token of a chat's later turns, with and without the prefix
cache, in one run (these machines are noisy: the figures that matter are
the ratios printed at the end, measured side by side).

    OMP_NUM_THREADS=2 python -m benchmarks.bench_prefix_cache [--turns 8] [--answer-tokens 64] [--rounds 2]

A conversation of `--turns` turns on the embedded model, each turn sending
everything so far with the model's own earlier answers (as a chat client
does). Two engines, one with `prefix_cache_gib=0`, answer every turn in
turn, plain and with one preference (PAD: a base row and a reward row).
Each turn's time to first token is the engine's prefill of that turn's
prompt(s) plus its first step. Prints a row per turn, then for the turns
after the first: the median TTFT without / with the cache, and the share of
prompt tokens the cache served. Then (`--join`) the step in which 16
requests sharing a cached system prompt join 16 running ones with long
prompts, with and without the cache. In float32 (`--dtype float32`) greedy
answers must be the same tokens with and without the cache (the script
fails otherwise); in bfloat16 (the default on CPUs with native bf16) a
cached prefix's KV was rounded in another batch than a fresh prefill's, as
happens between batch compositions without a cache, so the script counts
the turns whose answers are the same. A script, not a timed test.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from pad_core.engine import PadEngine
from pad_core.model_loading import engine_for_model, load_engine
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, Preference, SamplingParams

logger = logging.getLogger(__name__)

SYSTEM = "You are a friendly assistant. Answer every question with practical detail."
QUESTIONS = [
    "How do I sleep better?", "What should I eat before a run?", "How do I learn to cook?",
    "How can I focus at work?", "What is a good way to save money?", "How do I start learning the piano?",
    "How do I keep houseplants alive?", "How should I prepare for a job interview?",
    "What makes a good morning routine?", "How do I make new friends in a new city?",
]
PREFERENCE = Preference("I like short answers with a bit of humour")


def first_token_time(engine: PadEngine, request: ChatRequest) -> tuple[float, list[int], str, int]:
    """Seconds to the request's first token, its tokens, text and prompt length."""
    started = time.perf_counter()
    first = None
    tokens, text, prompt = [], "", 0
    for output in engine.generate([request]):
        if first is None and output.token_ids:
            first = time.perf_counter() - started
        tokens += output.token_ids
        text += output.text
        prompt = output.prompt_tokens
    return first or 0.0, tokens, text, prompt


def run_conversation(engines: dict[str, PadEngine], turns: int, answer_tokens: int,
                     preferences: list[Preference], exact: bool) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for turn in range(turns):
        messages = [*messages, {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
        row: dict = {"turn": turn}
        answers = {}
        for name, engine in engines.items():
            before = engine.stats()
            request = ChatRequest(f"{name}-{turn}", list(messages), list(preferences),
                                  SamplingParams(temperature=0.0, max_tokens=answer_tokens))
            seconds, tokens, text, prompt = first_token_time(engine, request)
            after = engine.stats()
            row[name] = seconds
            row[f"{name}_hit"] = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
            row[f"{name}_queried"] = after["prefix_cache_queried_tokens"] - before["prefix_cache_queried_tokens"]
            row["prompt"] = prompt
            answers[name] = (tokens, text)
        row["same"] = answers["off"][0] == answers["on"][0]
        if exact and not row["same"]:
            raise SystemExit(f"turn {turn}: the cache changed a float32 greedy answer")
        messages = [*messages, {"role": "assistant", "content": answers["on"][1]}]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="conversations per mode (the first warms up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--backend", default="transformers", choices=["transformers", "slots"])
    parser.add_argument("--join", type=int, default=16,
                        help="then: requests sharing a cached system prompt that join as many running ones (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    engines = {"off": load_engine(EngineSettings(prefix_cache_gib=0, dtype=args.dtype, backend=args.backend)),
               "on": load_engine(EngineSettings(dtype=args.dtype, backend=args.backend))}
    dtype = engines["on"].runners["base"].model.dtype
    print(f"embedded model, {dtype}, {args.threads} threads, {args.backend} backend")
    for mode, preferences in (("plain", []), ("PAD, one preference", [PREFERENCE])):
        rows = []
        for _ in range(args.rounds):
            cache = engines["on"].runners["base"].prefix_cache
            cache.clear()  # each round starts from an empty cache
            rows = run_conversation(engines, args.turns, args.answer_tokens, preferences, dtype == torch.float32)
        print(f"\n{mode}: time to first token per turn (s)")
        print(f"{'turn':>4} {'prompt':>7} {'no cache':>9} {'cache':>7} {'served':>7}")
        for row in rows:
            served = row["on_hit"] / row["on_queried"] if row["on_queried"] else 0.0
            print(f"{row['turn']:>4} {row['prompt']:>7} {row['off']:>9.3f} {row['on']:>7.3f} {served:>7.0%}")
        later = rows[1:]
        off = statistics.median(r["off"] for r in later)
        on = statistics.median(r["on"] for r in later)
        served = sum(r["on_hit"] for r in later) / max(sum(r["on_queried"] for r in later), 1)
        same = sum(r["same"] for r in rows)
        print(f"turns 2-{args.turns}: median TTFT {off:.3f} s without, {on:.3f} s with the cache: "
              f"{off / on:.1f}x faster; the cache served {served:.0%} of their prompt tokens; "
              f"greedy answers the same in {same} of {len(rows)} turns")
    if args.join:
        base = engines["off"].runners["base"]
        steps = {gib: join_step(base.model, engines["off"].tokenizer, args.dtype, gib, args.join, 600)
                 for gib in (0, 1.0)}
        print(f"\n{args.join} requests sharing a cached system prompt join {args.join} running requests of "
              f"~1.2k tokens: that step takes {steps[0]:.2f} s without the cache, {steps[1.0]:.2f} s with it "
              f"({steps[0] / steps[1.0]:.1f}x)")


def join_step(model, tokenizer, dtype_name: str, gib: float, joining: int, long_words: int) -> float:
    """Seconds of the step in which `joining` new requests that share a
    cached system prompt join as many running requests with long prompts:
    the pause every running stream sees while they are prefilled."""
    engine = engine_for_model(model, tokenizer, EngineSettings(prefix_cache_gib=gib, max_prefill_tokens=10**6,
                                                               dtype=dtype_name))
    system = {"role": "system", "content": SYSTEM * 8}

    def short(tag: str) -> ChatRequest:
        return ChatRequest(tag, [system, {"role": "user", "content": f"Question {tag}?"}], [],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    list(engine.generate([short("warm")]))  # the system prompt is cached (with the cache on)
    for i in range(joining):
        engine.add_chat(ChatRequest(f"long{i}", [{"role": "user", "content": f"Document {i}: " + "lorem ipsum " *
                                                  long_words}], [], SamplingParams(max_tokens=12, temperature=0.0,
                                                                                    ignore_eos=True)))
    engine.step()
    for i in range(joining):
        engine.add_chat(short(f"s{i}"))
    started = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - started
    while engine.has_unfinished():
        engine.step()
    return seconds


if __name__ == "__main__":
    main()
