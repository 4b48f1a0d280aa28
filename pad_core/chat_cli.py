"""`pad chat`: answer one prompt on the model, plainly and personalized,
side by side, so a newcomer sees PAD working in one command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

from pad_core.engine import PadEngine
from pad_core.model_loading import load_engine
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams

DEFAULT_PROMPT = "How do I sleep better?"
DEFAULT_PREFERENCE = "I like short answers with a bit of humour"


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float
    finish_reason: str | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def answer(engine: PadEngine, request: ChatRequest) -> Answer:
    start = time.perf_counter()
    parts, tokens, finish = [], 0, None
    for output in engine.generate([request]):
        parts.append(output.text)
        tokens = output.completion_tokens
        finish = output.finish_reason or finish
    return Answer("".join(parts), tokens, time.perf_counter() - start, finish)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pad chat", description=__doc__)
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--preference", action="append", help="a user preference (repeatable)")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--weight", type=float, help="PAD guidance weight w (default: server default)")
    parser.add_argument("--top-k", type=int, help="candidates kept by the prescreen")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--model", help="'embedded', a Hugging Face model folder or a .gguf file")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--reward-model", default="self")
    parser.add_argument("--min-p", type=float, help="PAD prescreen floor (default: the server's)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = {key: value for key, value in (("model", args.model), ("dtype", args.dtype), ("device", args.device)) if value}
    settings = EngineSettings(**overrides)
    engine = load_engine(settings)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    preferences = [Preference(text) for text in (args.preference or [DEFAULT_PREFERENCE])]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    guidance = GuidanceParams(weight=args.weight, top_k=args.top_k, min_p=args.min_p, reward_model=args.reward_model)

    plain = answer(engine, ChatRequest("plain", messages, sampling=sampling))
    personalized = answer(engine, ChatRequest("pad", messages, preferences, sampling, guidance))

    out = sys.stdout
    out.write(f"model: {settings.resolved_served_name()}   prompt: {args.prompt}\n\n")
    out.write(f"--- plain decoding ({plain.tokens} tokens, {plain.tokens_per_second:.1f} tok/s) ---\n")
    out.write(plain.text.strip() + "\n\n")
    weight = settings.default_weight if args.weight is None else args.weight
    out.write(
        f"--- PAD, preference {' + '.join(repr(p.text) for p in preferences)}, w={weight:g} "
        f"({personalized.tokens} tokens, {personalized.tokens_per_second:.1f} tok/s) ---\n"
    )
    out.write(personalized.text.strip() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
