"""Engine benchmark (issue 2): ratios measured in one run on the embedded model.

    python -m benchmarks.bench_engine [--tokens 128] [--long-tokens 256] [--json out.json]

Prints, each as a ratio with its bar:
  1. PAD (self reward, one preference) single-stream tok/s / plain single-stream tok/s   >= 0.75
  2. PAD aggregate tok/s at 16 concurrent requests / PAD single-stream tok/s             >= 5
  3. plain single-stream tok/s / transformers generate() greedy tok/s                     >= 1.0
  4. PAD tok/s / the original PAD scripts' decoding (whole prefix recomputed for both
     models at every step, one request at a time), at --long-tokens new tokens           >= 10
and the peak resident memory of a process serving plain vs PAD requests.
Every request is forced to its full length (ignore_eos) so the counts are equal.
The first three ratios are medians over interleaved rounds (--rounds), since
the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from pad_core.engine import PadEngine
from pad_core.model_loading import engine_for_model, load_causal_lm, load_engine
from pad_core.guidance import personalized_reward, prescreen_top_k
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, Preference, SamplingParams

PROMPT = [{"role": "user", "content": "How do I sleep better?"}]
PREFERENCE = Preference("I like short answers with a bit of humour")


def request(request_id: str, tokens: int, preference: bool) -> ChatRequest:
    return ChatRequest(
        request_id,
        PROMPT,
        [PREFERENCE] if preference else [],
        SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
    )


def engine_tokens_per_second(engine: PadEngine, requests: list[ChatRequest]) -> float:
    start = time.perf_counter()
    generated = sum(len(output.token_ids) for output in engine.generate(requests))
    return generated / (time.perf_counter() - start)


@torch.inference_mode()
def generate_tokens_per_second(engine: PadEngine, model, tokens: int) -> float:
    """transformers' own greedy generate() on the same model object."""
    ids = torch.tensor([engine.prompts.encode(PROMPT)], device=model.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


@torch.inference_mode()
def recompute_tokens_per_second(engine: PadEngine, model, tokens: int) -> float:
    """The original PAD scripts' loop: no KV cache, one request, and both the
    policy and the reward model re-read the whole prefix at every step (with
    the engine's default weight and top_k, like the PAD side)."""
    top_k, weight = engine.settings.default_top_k, engine.settings.default_weight
    base = engine.prompts.encode(PROMPT)
    reward = engine.prompts.encode_with_preference(PROMPT, PREFERENCE.text)
    start = time.perf_counter()
    for _ in range(tokens):
        base_logits = model(torch.tensor([base])).logits[:, -1].float()
        reward_logits = model(torch.tensor([reward])).logits[:, -1].float()
        candidates, valid = prescreen_top_k(base_logits, torch.tensor([top_k]))
        base_c, reward_c = base_logits.gather(1, candidates), reward_logits.gather(1, candidates)
        scores = base_c + weight * personalized_reward(reward_c, base_c, valid)
        token = int(candidates[0, scores.argmax(dim=-1)[0]])
        base.append(token)
        reward.append(token)
    return tokens / (time.perf_counter() - start)


def memory_mib(preference: bool, tokens: int) -> tuple[float, float]:
    """(peak RSS, RSS growth while decoding) of a fresh process that loads the
    engine and serves `--concurrency` requests, in MiB."""
    code = f"from benchmarks.bench_engine import memory_probe; memory_probe({preference}, {tokens})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, growth = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(growth)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def memory_probe(preference: bool, tokens: int, concurrency: int = 16) -> None:
    engine = load_engine(EngineSettings())
    loaded = _rss_mib()
    peak = loaded
    for _ in engine.generate([request(f"m{i}", tokens, preference) for i in range(concurrency)]):
        peak = max(peak, _rss_mib())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak - loaded)


def line(name: str, value: float, bar: float) -> dict:
    verdict = "PASS" if value >= bar else "FAIL"
    print(f"  {name:<62} {value:7.2f}   (bar >= {bar:g})  {verdict}")
    return {"name": name, "ratio": value, "bar": bar, "pass": value >= bar}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (median)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    settings = EngineSettings()
    model, tokenizer = load_causal_lm(settings.model, settings)
    engine = engine_for_model(model, tokenizer, settings)
    dtype = model.dtype
    print(f"model {settings.resolved_served_name()} ({dtype}, {torch.get_num_threads()} threads), "
          f"{args.tokens} new tokens per request, {args.rounds} interleaved rounds")
    engine_tokens_per_second(engine, [request("warmup", 16, True)])

    # The machine is shared: each round measures the compared quantities back
    # to back, and each ratio is the median of its per-round ratios, so noise
    # that lasts a round hits both sides of a ratio alike.
    rounds = []
    for index in range(args.rounds):
        rounds.append({
            "plain": engine_tokens_per_second(engine, [request(f"plain{index}", args.tokens, False)]),
            "pad": engine_tokens_per_second(engine, [request(f"pad{index}", args.tokens, True)]),
            "pad_many": engine_tokens_per_second(
                engine, [request(f"c{index}-{i}", args.tokens, True) for i in range(args.concurrency)]
            ),
            "generate": generate_tokens_per_second(engine, model, args.tokens),
        })  # fmt: skip
    pad_long = engine_tokens_per_second(engine, [request("pad-long", args.long_tokens, True)])
    recompute = recompute_tokens_per_second(engine, model, args.long_tokens)
    plain, pad, pad_many, hf = (statistics.median(r[key] for r in rounds) for key in ("plain", "pad", "pad_many", "generate"))
    memory_plain, growth_plain = memory_mib(False, args.tokens)
    memory_pad, growth_pad = memory_mib(True, args.tokens)

    print("\nthroughput (tokens/s, median of the rounds)")
    for name, value in [
        ("plain, single stream", plain),
        ("PAD, single stream", pad),
        (f"PAD, {args.concurrency} concurrent (aggregate)", pad_many),
        ("transformers generate(), greedy", hf),
        (f"PAD, single stream, {args.long_tokens} tokens", pad_long),
        (f"original PAD loop (no KV cache), {args.long_tokens} tokens", recompute),
    ]:
        print(f"  {name:<62} {value:7.2f}")
    print("\nratios")
    def median_ratio(top: str, bottom: str) -> float:
        return statistics.median(r[top] / r[bottom] for r in rounds)

    results = [
        line("PAD single / plain single", median_ratio("pad", "plain"), 0.75),
        line(f"PAD {args.concurrency} concurrent / PAD single", median_ratio("pad_many", "pad"), 5.0),
        line("plain single / transformers generate()", median_ratio("plain", "generate"), 1.0),
        line(f"PAD / original PAD loop at {args.long_tokens} tokens", pad_long / recompute, 10.0),
    ]
    print("\nmemory of a process serving 16 requests (MiB): peak RSS, and its growth while decoding")
    print(f"  {'plain (no preference)':<62} {memory_plain:7.0f}   +{growth_plain:.0f}")
    print(f"  {'PAD (one preference)':<62} {memory_pad:7.0f}   +{growth_pad:.0f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "rounds": rounds,
                    "tokens_per_second": {"plain": plain, "pad": pad, "pad_concurrent": pad_many, "generate": hf,
                                          "pad_long": pad_long, "recompute_long": recompute},
                    "ratios": results,
                    "peak_memory_mib": {"plain": memory_plain, "pad": memory_pad},
                    "decode_memory_growth_mib": {"plain": growth_plain, "pad": growth_pad},
                },
                handle,
                indent=2,
            )
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
