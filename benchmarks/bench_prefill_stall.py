"""How long a long prompt stalls the streams already running, by prefill
piece size (`max_prefill_tokens`), in one run (these machines are noisy:
compare the rows of one run, not runs).

    OMP_NUM_THREADS=2 python -m benchmarks.bench_prefill_stall [--prompt-words 1500] [--budgets 0,2048,512,256]

On the embedded model: a plain request is decoding when a long PAD request
(one preference: a base row and a reward row) arrives. For each budget
(0: no chunking, the whole prompt in one step) it prints the running
stream's longest gap between two tokens while the long prompt is written,
its median gap, and the long request's time to first token. Chunking
bounds the gap by one piece's prefill; the long request's own TTFT grows
a little (more, smaller forwards, and a decode step between pieces).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pad_core.model_loading import load_engine
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, Preference, SamplingParams

PREFERENCE = Preference("I like short answers with a bit of humour")


def stall(engine, prompt_words: int) -> tuple[float, float, float]:
    """(longest gap, median gap of the running stream while the long prompt
    is written, the long request's time to first token), in seconds."""
    running = ChatRequest("running", [{"role": "user", "content": "Tell me a long story."}], [],
                          SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True))
    long = ChatRequest("long", [{"role": "user", "content": "Summarise: " + "the quick brown fox " * (prompt_words // 4)}],
                       [PREFERENCE], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.add_chat(running)
    for _ in range(5):  # running, its prompt written
        engine.step()
    engine.add_chat(long)
    arrived = last = time.perf_counter()
    gaps, first_token = [], None
    while first_token is None:
        outputs = engine.step()
        now = time.perf_counter()
        if any(o.request_id == "running" and o.token_ids for o in outputs):
            gaps.append(now - last)
            last = now
        if any(o.request_id == "long" and o.token_ids for o in outputs):
            first_token = now - arrived
    engine.abort("running")
    while engine.has_unfinished():
        engine.step()
    return max(gaps), statistics.median(gaps), first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-words", type=int, default=1500)
    parser.add_argument("--budgets", default="0,2048,512,256", help="max_prefill_tokens values; 0: no chunking")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "slots"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    engines = {b: load_engine(EngineSettings(backend=args.backend, chunked_prefill=b > 0,
                                             max_prefill_tokens=b or 10**6)) for b in budgets}
    stall(engines[budgets[0]], 200)  # warm-up
    print(f"embedded model, {args.backend} backend, {args.threads} threads, a ~{args.prompt_words}-word PAD prompt "
          f"arriving while a plain stream decodes")
    print(f"{'budget':>8} {'longest gap':>12} {'median gap':>11} {'long TTFT':>10}")
    results = {}
    for budget in budgets:
        results[budget] = stall(engines[budget], args.prompt_words)
        longest, median, ttft = results[budget]
        print(f"{budget or 'whole':>8} {longest:>11.2f}s {median:>10.3f}s {ttft:>9.2f}s")
    if 0 in results:
        whole = results[0]
        for budget in budgets:
            if budget:
                longest, _, ttft = results[budget]
                print(f"budget {budget}: the running stream's longest gap {whole[0] / longest:.1f}x shorter than "
                      f"whole-prompt prefill; the long request's TTFT {ttft / whole[2]:.2f}x")


if __name__ == "__main__":
    main()
