"""`pad train PAIRS.jsonl --out ADAPTER_DIR`: train a PersRM LoRA adapter."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pad_core.errors import EngineError
from pad_core.model_loading import load_causal_lm
from pad_core.settings import EngineSettings
from pad_core.training.pairs import PairFileError, load_pairs
from pad_core.training.trainer import TrainSettings, train_adapter


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="pad train", description=__doc__)
    parser.add_argument("pairs", help="JSONL of {messages|prompt, preference, chosen, rejected}")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument("--model", default="embedded", help="base model: 'embedded', a HF folder or a .gguf")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    for name, field in TrainSettings.model_fields.items():
        if name == "preference_template":
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=field.description)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = TrainSettings(**{name: getattr(args, name) for name in TrainSettings.model_fields if hasattr(args, name)})
    try:
        pairs = load_pairs(args.pairs)
        model, tokenizer = load_causal_lm(args.model, EngineSettings(device=args.device, dtype=args.dtype))
    except (PairFileError, EngineError, OSError) as exc:
        print(f"pad train: {exc}", file=sys.stderr)
        return 2
    summary = train_adapter(model, tokenizer, pairs, settings, Path(args.out), resume=args.resume)
    print(json.dumps({"adapter": args.out, **summary["metrics"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
