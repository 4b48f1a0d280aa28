"""Reward-adapter throughput (issue 6): a LoRA PersRM served by name costs
little next to the `self` reward, because base rows and adapter rows of
different requests still run in one batched forward (batched multi-LoRA,
`pad_core/lora.py`).

    python -m benchmarks.bench_adapter [--concurrency 16] [--tokens 128] [--rounds 3]

Builds a LoRA adapter on the embedded model (rank 8 on q/k/v/o, the
`pad train` default; its weights are random, which costs the same compute
as trained ones), and measures 16 concurrent PAD requests with `self` on an
engine without adapters and with the adapter on an engine serving it, in
interleaved rounds. Prints the median
ratio adapter / self (bar >= 0.7).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.bench_engine import PREFERENCE, PROMPT
from pad_core.engine import PadEngine
from pad_core.model_loading import load_engine
from pad_core.model_loading import load_causal_lm
from pad_core.settings import EngineSettings
from pad_core.training.trainer import TrainSettings, wrap_with_lora
from pad_core.types import ChatRequest, GuidanceParams, SamplingParams


def make_adapter(folder: str) -> None:
    model, _ = load_causal_lm("embedded", EngineSettings(dtype="float32"))
    peft_model = wrap_with_lora(model, TrainSettings())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # B = 0 would be a no-op adapter
    peft_model.save_pretrained(folder)


def rate(engine: PadEngine, reward_model: str, concurrency: int, tokens: int) -> float:
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    requests = [
        ChatRequest(f"{reward_model}-{i}", PROMPT, [PREFERENCE], sampling, GuidanceParams(reward_model=reward_model))
        for i in range(concurrency)
    ]
    start = time.perf_counter()
    generated = sum(len(o.token_ids) for o in engine.generate(requests))
    return generated / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        make_adapter(folder)
        # `self` on an engine with no adapter at all (no peft in the forward),
        # the adapter on an engine that serves it: the strict comparison.
        plain_engine = load_engine(EngineSettings())
        adapter_engine = load_engine(EngineSettings(reward_adapters={"persrm": folder}))
        rate(plain_engine, "self", 2, 8)  # warm-up
        rate(adapter_engine, "persrm", 2, 8)
        rounds = []
        for _ in range(args.rounds):
            self_rate = rate(plain_engine, "self", args.concurrency, args.tokens)
            adapter_rate = rate(adapter_engine, "persrm", args.concurrency, args.tokens)
            rounds.append((self_rate, adapter_rate))
    ratio = statistics.median(a / s for s, a in rounds)
    print(f"{args.concurrency} concurrent PAD requests x {args.tokens} tokens, embedded model")
    for index, (self_rate, adapter_rate) in enumerate(rounds):
        print(f"  round {index + 1}: self {self_rate:7.2f} tok/s   LoRA adapter {adapter_rate:7.2f} tok/s")
    print(f"  ratio adapter / self (median) {ratio:.2f}   (bar >= 0.7)  {'PASS' if ratio >= 0.7 else 'FAIL'}")
    return 0 if ratio >= 0.7 else 1


if __name__ == "__main__":
    raise SystemExit(main())
