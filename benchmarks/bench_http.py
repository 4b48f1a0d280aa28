"""HTTP benchmark (issue 3): the gateway and the IPC cost little.

    python -m benchmarks.bench_http [--concurrency 16] [--tokens 128] [--rounds 2]

The same load, in one run: 16 concurrent PAD requests (self reward, one
preference, 128 new tokens each, greedy) directly on an in-process engine,
and through `pad serve` (a separate process: gateway + worker) with the
openai async client, streaming. The two alternate for --rounds rounds
(engine/HTTP, then HTTP/engine, ...), so a change in the machine's load
weighs on both alike. Prints the aggregate tokens/s of both per round, the
ratio over all rounds (bar >= 0.8), p50/p95 time to first token and
inter-token latency over HTTP, and the CPU spent per generated token: the
in-process engine's, and the worker's, the gateway's and the client's (on a
machine shared with other work, tokens per CPU-second compare the two sides
even when the wall-clock rates are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import openai

from benchmarks.bench_engine import PREFERENCE
from pad_core.engine import PadEngine
from pad_core.model_loading import load_engine
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, SamplingParams
from server.tools.local_server import free_port, wait_healthy

MODEL = "smollm2-135m-instruct"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def prompts(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Give me tip number {i + 1} for sleeping better."}] for i in range(count)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Run:
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def in_process(engine: PadEngine, concurrency: int, tokens: int) -> Run:
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0)
    requests = [ChatRequest(f"r{i}-{time.monotonic_ns()}", p, [PREFERENCE], sampling)
                for i, p in enumerate(prompts(concurrency))]
    start, cpu_start = time.perf_counter(), time.process_time()
    generated = sum(len(o.token_ids) for o in engine.generate(requests))
    return Run(generated, time.perf_counter() - start, cpu={"engine": time.process_time() - cpu_start})


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


async def over_http(client, concurrency: int, tokens: int, pids: dict[str, int]) -> Run:
    ttft, itl = [], []
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    start = time.perf_counter()
    counts = await asyncio.gather(*(one_stream(client, p, tokens, ttft, itl) for p in prompts(concurrency)))
    seconds = time.perf_counter() - start
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["client"] = time.process_time() - client_before
    return Run(sum(counts), seconds, ttft, itl, cpu)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values[0] if values else 0.0)


def start_server(data_dir: str) -> tuple[subprocess.Popen, str, dict[str, int]]:
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--data-dir", data_dir]
    process = subprocess.Popen(command)
    root = f"http://127.0.0.1:{port}"
    wait_healthy(root, process, timeout=600)
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as children:
        worker = int(children.read().split()[0])
    return process, f"{root}/v1", {"gateway": process.pid, "worker": worker}


async def http_rounds(base_url, pids, schedule, engine, concurrency, tokens):
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    await one_stream(client, prompts(1)[0], 8, [], [])  # warm-up
    results: list[tuple[Run, Run]] = []
    for http_first in schedule:
        if http_first:
            http = await over_http(client, concurrency, tokens, pids)
            local = in_process(engine, concurrency, tokens)
        else:
            local = in_process(engine, concurrency, tokens)
            http = await over_http(client, concurrency, tokens, pids)
        print(f"  round {len(results) + 1}: in-process {local.rate:7.2f} tok/s   HTTP {http.rate:7.2f} tok/s"
              f"   ratio {http.rate / local.rate:5.2f}", flush=True)
        results.append((local, http))
    await client.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    # Same prompts, same greedy settings, same model: both sides generate the
    # same tokens, so the tokens/s compare like for like.
    engine = load_engine(EngineSettings())
    list(engine.generate([ChatRequest("warm-up", prompts(1)[0], [PREFERENCE], SamplingParams(max_tokens=8, temperature=0.0))]))
    print(f"{args.concurrency} concurrent PAD requests x {args.tokens} new tokens, embedded model, "
          f"{args.rounds} interleaved rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="pad-bench-http-") as data_dir:
        process, base_url, pids = start_server(data_dir)
        try:
            schedule = [bool(i % 2) for i in range(args.rounds)]
            results = asyncio.run(http_rounds(base_url, pids, schedule, engine, args.concurrency, args.tokens))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)

    local_rate = sum(r.tokens for r, _ in results) / sum(r.seconds for r, _ in results)
    http_tokens = sum(h.tokens for _, h in results)
    http_rate = http_tokens / sum(h.seconds for _, h in results)
    ttft = [t for _, h in results for t in h.ttft]
    itl = [t for _, h in results for t in h.itl]
    cpu = {name: sum(h.cpu[name] for _, h in results) for name in ("gateway", "worker", "client")}
    ratio = http_rate / local_rate
    print(f"  in-process engine       {local_rate:8.2f} tok/s")
    print(f"  HTTP (openai async)     {http_rate:8.2f} tok/s")
    print(f"  ratio HTTP / in-process {ratio:8.2f}   (bar >= 0.8)  {'PASS' if ratio >= 0.8 else 'FAIL'}")
    print(f"  time to first token     p50 {percentile(ttft, 50) * 1000:7.0f} ms   p95 {percentile(ttft, 95) * 1000:7.0f} ms")
    print(f"  inter-token latency     p50 {percentile(itl, 50) * 1000:7.0f} ms   p95 {percentile(itl, 95) * 1000:7.0f} ms")
    per_token = {name: seconds / max(http_tokens, 1) * 1000 for name, seconds in cpu.items()}
    local_per_token = sum(r.cpu["engine"] for r, _ in results) / sum(r.tokens for r, _ in results) * 1000
    print(f"  CPU per generated token in-process {local_per_token:.2f} ms; HTTP: worker {per_token['worker']:.2f} ms,"
          f" gateway {per_token['gateway']:.2f} ms, openai client {per_token['client']:.2f} ms"
          f" (tokens per CPU-second, HTTP / in-process: {local_per_token / sum(per_token.values()):.2f})")
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
