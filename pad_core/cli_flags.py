"""Command-line flags generated from a pydantic-settings class: one flag per
field, its help the field's description plus its default and its PAD_*
variable, so no setting lacks a flag and no flag drifts from its setting.

Flags default to "not given" (None): a value the user did not type must not
hide a PAD_* variable, so only the flags given become overrides. No torch
here: `pad serve` (the gateway) uses it.

    parser = argparse.ArgumentParser(...)
    add_settings_flags(parser, ServerSettings)
    settings = ServerSettings(**settings_overrides(parser.parse_args(argv), ServerSettings))
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

MAX_DEFAULT_CHARS = 60


def _unwrap_optional(annotation: Any) -> Any:
    """X | None -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def field_kind(field: FieldInfo) -> tuple[str, Any]:
    """How a field reads from the command line: ("bool" | "dict" | "list" |
    "choice" | "scalar", the element type or the choices)."""
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "bool", bool
    if origin is dict:
        return "dict", str
    if origin in (list, tuple):
        return "list", str
    if origin is Literal:
        return "choice", list(typing.get_args(annotation))
    if annotation in (int, float, str):
        return "scalar", annotation
    if annotation is Path:
        return "scalar", str
    return "scalar", str


def flag_names(name: str, kind: str, field: FieldInfo | None = None) -> list[str]:
    """--field-name; a collection also gets its singular (--api-key for
    api_keys), which is the one to repeat; then the field's `flag_aliases`
    (vLLM's name of the same setting, so a `vllm serve` line carries over)."""
    flag = "--" + name.replace("_", "-")
    names = [flag[:-1], flag] if kind in ("dict", "list") and flag.endswith("s") else [flag]
    extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
    return names + list(extra.get("flag_aliases", ()))


def env_names(name: str, field: FieldInfo, prefix: str) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        names = [choice for choice in alias.choices if isinstance(choice, str) and choice.startswith(prefix)]
        if names:
            return names
    return [f"{prefix}{name.upper()}"]


def describe_default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None or value == {} or value == []:
        return "none"
    text = str(value)
    if "\n" in text or len(text) > MAX_DEFAULT_CHARS:
        text = repr(text)
        if len(text) > MAX_DEFAULT_CHARS:
            text = text[: MAX_DEFAULT_CHARS - 3] + "..."
    return text


def field_help(name: str, field: FieldInfo, kind: str, prefix: str) -> str:
    description = field.description or name.replace("_", " ")
    parts = [description]
    if kind in ("dict", "list"):
        parts.append("repeatable")
    default = describe_default(field)
    if not (default == "none" and "default" in description):  # the description says it better
        parts.append(f"default: {default}")
    parts.append(f"env {' or '.join(env_names(name, field, prefix))}")
    return "; ".join(parts).replace("%", "%%")  # argparse formats help with %


def metavar(name: str, kind: str, detail: Any) -> str:
    if kind == "dict":
        return "NAME=VALUE"
    if detail is int:
        return "N"
    if detail is float:
        return "X"
    word = name.split("_")[-1].upper()
    return word[:-1] if kind == "list" and word.endswith("S") else word


def add_settings_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings_cls: type[BaseSettings],
    names: Iterable[str] | None = None,
) -> None:
    """One flag per field of settings_cls (or per field in `names`, in that order)."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    fields = settings_cls.model_fields
    for name in fields if names is None else names:
        field = fields[name]
        kind, detail = field_kind(field)
        flags = flag_names(name, kind, field)
        help_text = field_help(name, field, kind, prefix)
        if kind == "bool":
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind in ("dict", "list"):
            parser.add_argument(*flags, dest=name, action="append", default=None, metavar=metavar(name, kind, detail),
                                help=help_text)
        elif kind == "choice":
            parser.add_argument(*flags, dest=name, choices=detail, default=None, help=help_text)
        else:  # a field's `nargs` ("+": vLLM's --served-model-name a b) takes several values as a list
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            parser.add_argument(*flags, dest=name, type=detail, default=None, metavar=metavar(name, kind, detail),
                                help=help_text, **({"nargs": extra["nargs"]} if "nargs" in extra else {}))


def parse_pairs(values: list[str], flag: str) -> dict[str, Any]:
    """["a=1", "b=2"] -> {"a": "1", "b": "2"}; a value that is a JSON object
    adds its pairs (vLLM's form: --override-generation-config '{"temperature":
    0.5}'); ValueError naming the flag otherwise."""
    result: dict[str, Any] = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                pairs = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{flag}: {value!r} is not a JSON object ({exc})") from exc
            if not isinstance(pairs, dict):
                raise ValueError(f"{flag}: {value!r} is not a JSON object")
            result.update(pairs)
            continue
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} takes NAME=VALUE, got {value!r}")
        result[name] = rest
    return result


def settings_overrides(args: argparse.Namespace, settings_cls: type[BaseSettings]) -> dict[str, Any]:
    """The fields whose flags were given, ready for settings_cls(**overrides).
    ValueError for a malformed NAME=VALUE."""
    overrides: dict[str, Any] = {}
    for name, field in settings_cls.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        kind, _ = field_kind(field)
        if kind == "dict":
            value = parse_pairs(value, flag_names(name, kind)[0])
        overrides[name] = value
    return overrides
