"""The `pad` command: `pad serve`, `pad chat`, `pad train`, `pad data synth`,
`pad eval`, `pad bench`, `pad run-batch`, `pad feedback export|prune`, `pad --version`.
Subcommands import lazily and get their own argv (so `--help` reaches each):
`pad serve` (the gateway) never imports torch."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import ssl
import sys

from pydantic import ValidationError

from pad_core.cli_flags import add_settings_flags, settings_overrides

USAGE = """usage: pad <command> [options]      (pad <command> --help for its options)

commands:
  serve             start the OpenAI-compatible server (gateway + worker)
  chat              answer one prompt plainly and personalized, side by side
  train             train a personalized reward model (LoRA adapter)
  data synth        build preference pairs with the model itself
  eval              does PAD follow preferences better than prompting?
  bench             HTTP load benchmark, plain vs PAD
  run-batch         answer a file of requests in OpenAI's batch format (vLLM's run-batch)
  feedback export   write preference pairs from user feedback
  feedback prune    delete completions and responses kept past their retention

options:
  -h, --help        this text
  -V, --version     the installed version
"""

DATA_USAGE = """usage: pad data <command> [options]

commands:
  synth             build preference pairs with the model itself (pad data synth --help)
"""


def version() -> str:
    try:
        return importlib.metadata.version("pad-server")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def serve_parser() -> argparse.ArgumentParser:
    """`pad serve` flags: one per ServerSettings field (engine, store and
    gateway settings), generated so that none is missing or undocumented."""
    from pad_core.settings import EngineSettings
    from server.settings import ServerSettings
    from server.store.config import StoreSettings

    parser = argparse.ArgumentParser(
        prog="pad serve",
        description="Start the PAD server (gateway + a local worker). Every flag is also a PAD_* variable; "
        "a flag given wins over the variable.",
    )
    engine = list(EngineSettings.model_fields)
    store = [name for name in StoreSettings.model_fields if name not in engine]  # max_preferences is in both
    gateway = [name for name in ServerSettings.model_fields if name not in engine and name not in store]
    for title, names in (("server", gateway), ("model and decoding (the worker)", engine), ("storage", store)):
        add_settings_flags(parser.add_argument_group(title), ServerSettings, names)
    return parser


def serve(argv: list[str]) -> int:
    parser = serve_parser()
    args = parser.parse_args(argv)
    from server.settings import ServerSettings

    try:
        overrides = settings_overrides(args, ServerSettings)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        print(f"pad serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_tls_files(settings)
    except (OSError, ssl.SSLError) as exc:
        print(f"pad serve: cannot serve HTTPS with ssl_certfile {settings.ssl_certfile!r} and ssl_keyfile "
              f"{settings.ssl_keyfile!r}: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from server.app import create_app

    uvicorn.run(create_app(settings), **uvicorn_options(settings))
    return 0


def uvicorn_options(settings) -> dict:
    """uvicorn's arguments for the server's settings."""
    return {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
            "root_path": settings.root_path, "ssl_certfile": settings.ssl_certfile,
            "ssl_keyfile": settings.ssl_keyfile, "timeout_graceful_shutdown": settings.shutdown_timeout_s}


def check_tls_files(settings) -> None:
    """Loads the certificate and its key as uvicorn will, so a wrong one is
    a clear start-up error before the model loads, not a traceback."""
    if settings.ssl_certfile is not None:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)


def data(argv: list[str]) -> int:
    if argv[:1] == ["synth"]:
        from pad_core.training.synth import main as synth_main

        return synth_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(DATA_USAGE)
        return 0 if argv else 2
    print(f"pad: unknown command 'data {argv[0]}'\n\n{DATA_USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"pad {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    # Every command gets its own argv, --help included.
    if command == "serve":
        return serve(rest)
    if command == "chat":
        from pad_core.chat_cli import main as chat_main

        return chat_main(rest)
    if command == "train":
        from pad_core.training.cli import main as train_main

        return train_main(rest)
    if command == "data":
        return data(rest)
    if command == "eval":
        from server.tools.eval import main as eval_main

        return eval_main(rest)
    if command == "bench":
        from server.tools.bench import main as bench_main

        return bench_main(rest)
    if command == "run-batch":
        from server.tools.run_batch import main as run_batch_main

        return run_batch_main(rest)
    if command == "feedback":
        from server.store.export import main as feedback_main

        return feedback_main(rest)
    print(f"pad: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
