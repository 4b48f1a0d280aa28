"""`pad feedback export|prune`: training pairs from stored feedback.

`pad feedback export --out pairs.jsonl` writes one JSON object a line,
{"messages", "preference", "chosen", "rejected"}: the format `pad train`
reads (pad_core.training.pairs). The database is the server's: PAD_DB_URL,
else SQLite under PAD_DATA_DIR (or --db-url / --data-dir)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from server.store.config import StoreConfig, StoreSettings
from server.store.records import ExportResult
from server.store.repository import Store

logger = logging.getLogger(__name__)


def write_pairs_jsonl(result: ExportResult, out: str, with_meta: bool = False) -> int:
    """Writes the pairs (atomically for a file: temp file + rename); '-' is stdout."""
    lines = []
    for pair in result.pairs:
        record = dict(pair) if with_meta else {k: pair[k] for k in ("messages", "preference", "chosen", "rejected")}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if out == "-":
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return len(lines)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(lines)


def _config(args: argparse.Namespace) -> StoreConfig:
    overrides = {}
    if args.db_url:
        overrides["db_url"] = args.db_url
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir)
    return StoreConfig.from_settings(StoreSettings(**overrides))


async def export_to(config: StoreConfig, out: str, users: Sequence[str] | None = None, with_meta: bool = False) -> ExportResult:
    store = await Store.open(config)
    try:
        result = await store.export_pairs(users=users or None)
    finally:
        await store.close()
    write_pairs_jsonl(result, out, with_meta=with_meta)
    return result


async def _prune(config: StoreConfig) -> int:
    store = await Store.open(config)
    try:
        return await store.prune()
    finally:
        await store.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pad feedback", description="Feedback kept by the server")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db-url", help="database URL (default: PAD_DB_URL, else SQLite in the data dir)")
    common.add_argument("--data-dir", help="data dir holding pad.db (default: PAD_DATA_DIR or ~/.local/share/pad-server)")
    export = sub.add_parser(
        "export", parents=[common], help="write preference pairs {messages, preference, chosen, rejected} as JSONL"
    )
    export.add_argument("--out", "-o", required=True, help="output .jsonl file ('-' for stdout)")
    export.add_argument("--user", action="append", help="only this user's completions (repeatable)")
    export.add_argument("--with-meta", action="store_true", help="add a 'meta' object (source, user, completion ids)")
    sub.add_parser("prune", parents=[common], help="delete completions and responses older than their retention now")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`pad feedback ARGS`: argv starts with the subcommand (export | prune);
    without one (a caller that consumed "export"), export is meant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("export", "prune", "-h", "--help"):
        argv.insert(0, "export")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _config(args)
    except ValueError as exc:
        sys.stderr.write(f"pad feedback: {exc}\n")
        return 2
    if args.command == "export":
        result = asyncio.run(export_to(config, args.out, args.user, args.with_meta))
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(result.skipped.items())) or "none"
        sys.stderr.write(f"wrote {len(result.pairs)} pairs to {args.out} (skipped: {skipped})\n")
    else:
        removed = asyncio.run(_prune(config))
        sys.stderr.write(f"pruned {removed} expired completion rows\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
