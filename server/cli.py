"""The `pad` command: `pad serve`, `pad chat`, `pad train`, `pad data synth`,
`pad eval`, `pad bench`, `pad feedback export`. Subcommands import lazily:
`pad serve` (the gateway) never imports torch."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

USAGE = """usage: pad <command> [options]

commands:
  serve             start the OpenAI-compatible server (gateway + worker)
  chat              answer one prompt plainly and personalized, side by side
  train             train a personalized reward model (LoRA adapter)
  data synth        build preference pairs with the model itself
  eval              does PAD follow preferences better than prompting?
  bench             HTTP load benchmark, plain vs PAD
  feedback export   write preference pairs from user feedback
  feedback prune    delete completions kept past the feedback retention
"""


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pad serve", description="Start the PAD server. Every flag is also a PAD_* variable.")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--model", help="'embedded', a Hugging Face model folder, or a .gguf file")
    parser.add_argument("--served-model-name")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--reward-adapter", action="append", metavar="NAME=PATH", help="LoRA reward adapter (repeatable)")
    parser.add_argument("--reward-model", action="append", metavar="NAME=PATH", help="separate reward LM (repeatable)")
    parser.add_argument("--default-weight", type=float)
    parser.add_argument("--default-top-k", type=int)
    parser.add_argument("--max-running-requests", type=int)
    parser.add_argument("--max-batch-rows", type=int)
    parser.add_argument("--max-prefill-tokens", type=int)
    parser.add_argument("--num-threads", type=int, help="torch CPU threads of the worker")
    parser.add_argument("--max-queue", type=int, help="requests in flight before 429")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY[:user1,user2]")
    parser.add_argument("--api-keys-file")
    parser.add_argument("--cors-origin", action="append", dest="cors_origins")
    parser.add_argument("--worker-address", help="attach to a running worker, e.g. tcp://worker:5557")
    parser.add_argument("--worker-start-timeout", type=float, help="seconds a local worker may take to load")
    parser.add_argument("--worker-heartbeat-timeout", type=float, help="silence before a remote worker counts as down")
    parser.add_argument("--db-url")
    parser.add_argument("--data-dir")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def _pairs(values: list[str] | None, flag: str) -> dict[str, str] | None:
    if not values:
        return None
    result = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"pad serve: {flag} takes NAME=PATH, got {value!r}")
        result[name] = path
    return result


def serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("reward_adapter", "reward_model")}
    adapters, reward_models = _pairs(args.reward_adapter, "--reward-adapter"), _pairs(args.reward_model, "--reward-model")
    if adapters:
        overrides["reward_adapters"] = adapters
    if reward_models:
        overrides["reward_models"] = reward_models
    from server.settings import ServerSettings

    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        print(f"pad serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from server.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "chat":
        from pad_core.chat_cli import main as chat_main

        return chat_main(rest)
    if command == "train":
        from pad_core.training.cli import main as train_main

        return train_main(rest)
    if command == "data" and rest[:1] == ["synth"]:
        from pad_core.training.synth import main as synth_main

        return synth_main(rest[1:])
    if command == "eval":
        from server.tools.eval import main as eval_main

        return eval_main(rest)
    if command == "bench":
        from server.tools.bench import main as bench_main

        return bench_main(rest)
    if command == "feedback" and rest[:1] in (["export"], ["prune"]):
        from server.store.export import main as feedback_main

        return feedback_main(rest)
    print(f"pad: unknown command {' '.join(argv[:2])!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
