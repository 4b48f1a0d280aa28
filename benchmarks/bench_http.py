"""HTTP benchmark (issue 3): the gateway and the IPC cost little.

    python -m benchmarks.bench_http [--concurrency 16] [--tokens 128]

Runs the same load twice, in one run: 16 concurrent PAD requests (self
reward, one preference, 128 new tokens each) directly on an in-process
engine, then through `pad serve` (a separate process: gateway + worker) with
the openai async client, streaming. Prints aggregate tokens/s of both, their
ratio (bar >= 0.8), and p50/p95 time to first token and inter-token latency
over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import openai

from benchmarks.bench_engine import PREFERENCE
from pad_core.engine import PadEngine
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, SamplingParams
from server.tools.local_server import local_server

MODEL = "smollm2-135m-instruct"


def prompts(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Give me tip number {i + 1} for sleeping better."}] for i in range(count)]


def in_process(concurrency: int, tokens: int) -> float:
    engine = PadEngine.from_settings(EngineSettings())
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0)
    warmup = [ChatRequest("w", prompts(1)[0], [PREFERENCE], SamplingParams(max_tokens=8, temperature=0.0))]
    list(engine.generate(warmup))
    requests = [ChatRequest(f"r{i}", p, [PREFERENCE], sampling) for i, p in enumerate(prompts(concurrency))]
    start = time.perf_counter()
    generated = sum(len(o.token_ids) for o in engine.generate(requests))
    return generated / (time.perf_counter() - start)


async def one_stream(client, messages, tokens: int, ttft: list, itl: list) -> int:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"preference": PREFERENCE.text},
    )
    last, first, usage = start, True, 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            (ttft if first else itl).append(now - last)
            first, last = False, now
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return usage


async def over_http(base_url: str, concurrency: int, tokens: int) -> tuple[float, list, list]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    await one_stream(client, prompts(1)[0], 8, [], [])  # warm-up
    ttft, itl = [], []
    start = time.perf_counter()
    counts = await asyncio.gather(*(one_stream(client, p, tokens, ttft, itl) for p in prompts(concurrency)))
    return sum(counts) / (time.perf_counter() - start), ttft, itl


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values[0] if values else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    # Same prompts, same greedy settings, same model: both sides generate the
    # same tokens, so the tokens/s compare like for like.
    engine_rate = in_process(args.concurrency, args.tokens)
    with local_server(["--log-level", "warning"]) as base_url:
        http_rate, ttft, itl = asyncio.run(over_http(base_url, args.concurrency, args.tokens))
    ratio = http_rate / engine_rate
    print(f"{args.concurrency} concurrent PAD requests x {args.tokens} new tokens, embedded model")
    print(f"  in-process engine       {engine_rate:8.2f} tok/s")
    print(f"  HTTP (openai async)     {http_rate:8.2f} tok/s")
    print(f"  ratio HTTP / in-process {ratio:8.2f}   (bar >= 0.8)  {'PASS' if ratio >= 0.8 else 'FAIL'}")
    print(f"  time to first token     p50 {percentile(ttft, 50) * 1000:7.0f} ms   p95 {percentile(ttft, 95) * 1000:7.0f} ms")
    print(f"  inter-token latency     p50 {percentile(itl, 50) * 1000:7.0f} ms   p95 {percentile(itl, 95) * 1000:7.0f} ms")
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
