"""Structured outputs: JSON, JSON Schema and tool calls, and vLLM's regex,
choice and context-free grammar (Lark or GBNF), enforced by a grammar.

The grammar engine is llguidance (the Rust core behind Guidance; a backend of
vLLM, SGLang and llama.cpp): an Earley parser over a lexer that computes the
set of legal next tokens for a 49k vocabulary in tens of microseconds,
compiles a JSON Schema in about a millisecond, and has no Python
dependencies (xgrammar pulls triton into a CPU server).

Per request the engine keeps a `GrammarMatcher`; per step it asks
`StructuredOutputs.allowed_tokens` for a boolean mask of the constrained
rows, which `decoding.apply_token_mask` applies to the base logits BEFORE
PAD's prescreen: every candidate is legal, so the reward only chooses among
legal tokens. After each chosen token the matcher advances; once the grammar
is complete the request stops ("stop"). End-of-sequence tokens are legal only
where the grammar accepts.

JSON comes out in `json.dumps` style (", " and ": " separators, no newlines):
what small models have seen most, and no room for runaway whitespace.

Tool calls (kind "tool_calls") come out as a JSON array of
`{"name": ..., "arguments": {...}}` objects; `parse_tool_calls` turns the
text into `ToolCall`s for the request's last StepOutput. With `auto`
(tool_choice "auto") the grammar is a choice made at the first character
after any leading whitespace: that array, one call's object, or plain text
that opens with neither "[" nor "{" (a Lark grammar with the schemas
embedded, `optional_calls_grammar`); with a response_format too, the array
or the response's JSON.

Shapes: R constrained rows, V the model's vocabulary, W = ceil(V' / 32)
words of llguidance's packed bitmask (V' its tokenizer's vocabulary).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from pad_core.errors import InvalidRequestError
from pad_core.types import LEADING_SPACE, StructuredOutput, ToolCall, ToolFunction

logger = logging.getLogger(__name__)

# Compact JSON in json.dumps' default style; no free whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# A function without parameters (none given, or {}) takes none: OpenAI's
# reading ("omitting parameters defines a function with an empty parameter list").
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names (plus dots)
GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept per engine (LRU)
MAX_TOOLS = 128
MAX_CHOICES = 1024  # a `choice` constraint's options
MAX_GRAMMAR_CHARS = 100_000  # a regex's, a grammar's or the choices' text (a JSON Schema is bounded by the body)
# Grammar cost. Short text can be costly to follow: "(a{700}){700}" (15
# characters) compiles, then takes ~0.2 s a step for every row, and the decode
# loop computes the masks of all rows in turn, so every stream waits. For a
# regex, a choice or a grammar, a tenth of llguidance's default lexer fuel
# refuses that one at its second step in ~40 ms; JSON Schemas and tool sets
# keep the default (a set of 64 tools needs more than that tenth). A request
# whose mask takes over MAX_MASK_SECONDS at MASK_STRIKES steps fails alone
# (more than one, so a pause of the machine fails nobody).
TEXT_LEXER_FUEL = 100_000
MAX_MASK_SECONDS = 0.25
MASK_STRIKES = 2
MAX_INTEGER_DIGITS = 18  # an unbounded integer's digits (llguidance cannot compile int64's own range)
LARGEST_INTEGER = 10**MAX_INTEGER_DIGITS - 1


# ---- the grammar of a request (pure) -------------------------------------
# Keywords whose values are data, not schemas (a "$ref" in them is not one),
# and those whose values map names to schemas (any name, "const" included).
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
CONDITIONS = frozenset({"not", "if", "then", "else", "dependentSchemas"})  # left open by tightened
COMPOSITIONS = frozenset({"allOf", "anyOf", "oneOf"})
# Beside these an object's keys are more than its listed properties (tightened leaves it open).
OPEN_ENDED = frozenset({"additionalProperties", "unevaluatedProperties", "patternProperties", "allOf", "anyOf",
                        "oneOf", "$ref", "if", "then", "else", "dependentSchemas", "dependentRequired"})


def relocated(schema: Any, base: str) -> Any:
    """`schema` moved to the JSON pointer `base` inside a larger document:
    its local references ("#", "#/$defs/Place", ...) rewritten to point
    into it there. A tool's parameters made from nested pydantic models
    refer to their own root's `$defs`; inside the calls' schema that root
    is no longer the document's."""
    if isinstance(schema, list):
        return [relocated(item, base) for item in schema]
    if not isinstance(schema, dict) or "$id" in schema:
        return schema  # a resource of its own ($id): its references resolve against it, wherever it is
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + base + value[1:]
        elif key in DATA_KEYWORDS:
            out[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: relocated(sub, base) for name, sub in value.items()}
        else:
            out[key] = relocated(value, base)
    return out


def tightened(schema: Any) -> Any:
    """`schema` as the grammar enforces it, with two gaps a small model falls
    into closed (it writes until max_tokens through either):

    - `"additionalProperties": false` on an object schema that lists its
      properties and says nothing about others. JSON Schema allows unlisted
      keys by default, and the model keeps inventing keys (instructor's,
      pydantic-ai's and LangChain's schemas leave the keyword out).
      xgrammar and outlines (vLLM's defaults) read a missing keyword this
      way too; a client that wants other keys says
      `"additionalProperties": true` (or gives their schema). Only where
      the listed properties are all the keys: not beside an applicator that
      may add some (`allOf`, `anyOf`, `oneOf`, `$ref`, `if`/`then`/`else`,
      `dependentSchemas`, `dependentRequired`), not in a member of a
      composition whose object lists keys of its own (nor anything nested
      in such a member's compositions), not a `$defs` entry that a `$ref`
      uses that way (an `allOf` member, or beside properties: OpenAPI's
      inheritance), not where `required` names a key the object does not
      list; conditions (`not`, `if`...) are
      left as they are, since closing would change their meaning.
    - An integer with no bound on a side gets MAX_INTEGER_DIGITS digits at
      most there (the model wrote 30-60 digit numbers; no JSON parser
      client-side wants one, and int64 ends at 19 digits), unless an `enum`
      or `const` already says which."""
    return _tightened(schema, False, _shared_refs(schema))


def _tightened(schema: Any, in_composition: bool, shared: frozenset[str], pointer: str | None = "#") -> Any:
    """tightened, at JSON pointer `pointer` (None: one no `$ref` here names);
    `shared`: the `$ref` targets left open (_shared_refs)."""
    if isinstance(schema, list):
        return [_tightened(item, in_composition, shared, None) for item in schema]
    if not isinstance(schema, dict):
        return schema
    in_composition = in_composition or (pointer is not None and pointer in shared)
    owns_keys = any(key in schema for key in ("properties", "patternProperties", "required"))
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DATA_KEYWORDS or key in CONDITIONS:
            out[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            where = f"{pointer}/{key}/" if pointer is not None else None
            out[key] = {name: _tightened(sub, False, shared, where and where + name) for name, sub in value.items()}
        elif key in COMPOSITIONS and isinstance(value, list):
            member_open = in_composition or owns_keys or key == "allOf"
            out[key] = [_tightened(sub, member_open, shared, None) for sub in value]
        else:
            out[key] = _tightened(value, False, shared, None)
    if _closable(out) and not in_composition:
        out["additionalProperties"] = False
    types = out.get("type")
    integer = types == "integer" or (isinstance(types, list) and "integer" in types)
    if integer and "enum" not in out and "const" not in out:
        low, high = _bound(out, "minimum", "exclusiveMinimum"), _bound(out, "maximum", "exclusiveMaximum")
        if low is None and (high is None or high > -LARGEST_INTEGER):
            out["minimum"] = -LARGEST_INTEGER
        if high is None and (low is None or low < LARGEST_INTEGER):  # never below the schema's own minimum
            out["maximum"] = LARGEST_INTEGER
    return out


def _shared_refs(schema: Any) -> frozenset[str]:
    """Local `$ref` targets whose keys are a share of another object's: an
    `allOf` member's reference, or a reference beside keys of its own."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and any(key in node for key in ("properties", "patternProperties", "required",
                                                                 *COMPOSITIONS)):
            found.add(ref)
        members = node.get("allOf")
        for member in members if isinstance(members, list) else ():
            if isinstance(member, dict) and isinstance(member.get("$ref"), str):
                found.add(member["$ref"])
        for key, value in node.items():
            if key not in DATA_KEYWORDS:
                walk(value)

    walk(schema)
    return frozenset(found)


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str) -> float | None:
    """The schema's bound on a side (a number), if it has one; None if not.
    Present but not a number: an infinite one (left to the schema)."""
    for key in (inclusive, exclusive):
        if key in schema:
            value = schema[key]
            return value if isinstance(value, int | float) and not isinstance(value, bool) else float("inf")
    return None


def _closable(schema: dict[str, Any]) -> bool:
    """Whether the object's listed properties are all its keys (see tightened)."""
    listed = schema.get("properties")
    if not isinstance(listed, dict) or any(key in schema for key in OPEN_ENDED):
        return False
    required = schema.get("required")
    return not isinstance(required, list) or all(name in listed for name in required)


def tool_call_schema(tools: Sequence[ToolFunction], tool_choice: str | None, parallel: bool) -> dict[str, Any]:
    """JSON Schema of the answer of a tool-call request: a list of calls
    `[{"name": ..., "arguments": {...}}]`, each naming one of `tools` with
    arguments matching that function's parameters. A named `tool_choice`
    allows exactly one call of that function; `parallel=False` one call.
    Parameters with local references move to the root's `$defs` (one entry
    per function, references rewritten), where those references resolve."""
    chosen = [t for t in tools if tool_choice is None or t.name == tool_choice]
    defs: dict[str, Any] = {}
    calls = []
    for t in chosen:
        arguments, key = tightened(t.parameters or NO_ARGUMENTS), f"tool_{t.name}"
        moved = relocated(arguments, f"/$defs/{key}")
        if moved != arguments:  # it has local references
            defs[key], arguments = moved, {"$ref": f"#/$defs/{key}"}
        calls.append({
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if tool_choice is not None or not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def json_schema_for(spec: StructuredOutput) -> dict[str, Any]:
    """The JSON Schema the answer must match."""
    if spec.kind == "json_object":
        return ANY_OBJECT
    if spec.kind == "json_schema":
        return tightened(spec.json_schema)
    return tool_call_schema(spec.tools, spec.tool_choice, spec.parallel_tool_calls)


MAX_LEAD = 3  # whitespace characters allowed before the calls (a model constrained there could run on with them)


def optional_calls_grammar(calls_schema: dict[str, Any], options: dict[str, Any],
                           answer_schema: dict[str, Any] | None = None) -> str:
    """Lark source of a tool_choice "auto" answer. The calls' JSON array
    (`calls_schema`'s items, compiled with `options`, joined as json.dumps
    joins them), after up to MAX_LEAD whitespace characters (a tokenizer
    may start the answer with a space-prefixed "["); or one call's object (what models
    trained on single JSON calls write); or plain text whose first character
    after whitespace opens neither. With an `answer_schema` (a
    response_format), the array or JSON matching it instead.

    The choice is made by the answer's first characters, so a client
    streaming it knows at once which it is; free text then runs on until
    end-of-sequence (the TEXT lexeme never completes, so the grammar never
    ends a text answer)."""

    def embedded(schema: dict[str, Any]) -> str:
        return json.dumps({**schema, "x-guidance": options})  # ASCII: safe inside Lark

    defs = {"$defs": calls_schema["$defs"]} if "$defs" in calls_schema else {}
    more = "" if calls_schema.get("maxItems") == 1 else f' ({json.dumps(options["item_separator"])} call)*'
    space = "".join(f"\\x{ord(c):02x}" for c in LEADING_SPACE)
    rules = [f'calls: "[" call{more} "]"', f"call: %json {embedded({**calls_schema['items'], **defs})}",
             f"LEAD: /[{space}]{{1,{MAX_LEAD}}}/"]
    if answer_schema is None:
        rules = ["start: LEAD? calls | LEAD? call | TEXT", *rules,
                 f"TEXT: /[{space}]*[^{space}\\[\\{{][\\s\\S]*/"]
    else:
        rules = ["start: LEAD? calls | answer", *rules, f"answer: %json {embedded(answer_schema)}"]
    return "\n".join(rules) + "\n"


TEXT_KINDS = frozenset({"regex", "choice", "grammar"})


def text_grammar(llguidance, spec: StructuredOutput) -> str:
    """The llguidance grammar of a regex, choice or grammar constraint (the
    three vLLM's structured outputs add to JSON). A grammar may be Lark or
    GBNF (llguidance converts GBNF, as vLLM's guidance backend does); a
    choice is a Lark alternation of its strings, JSON-quoted."""
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choices))
    if is_gbnf(spec.grammar):
        return llguidance.grammar_from("gbnf", spec.grammar)
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


def is_gbnf(grammar: str) -> bool:
    """GBNF rules are written `name ::= ...`, Lark's `name: ...` (vLLM's own
    test; llguidance's `grammar_from` takes only a grammar with a `start:`
    line for Lark, and read outlines' `?start:` as broken GBNF)."""
    return "::=" in grammar


def compile_options(spec: StructuredOutput) -> dict[str, Any]:
    """llguidance JSON options: strict schemas refuse keywords the grammar
    engine does not implement; non-strict ones ignore them (`lenient`)."""
    strict = spec.strict or any(t.strict for t in spec.tools)
    if spec.whitespace_pattern is not None:  # vLLM's whitespace_pattern: that whitespace between JSON's tokens
        return {**JSON_OPTIONS, "item_separator": ",", "key_separator": ":", "whitespace_flexible": True,
                "whitespace_pattern": spec.whitespace_pattern, "lenient": not strict}
    return {**JSON_OPTIONS, "lenient": not strict}


def check_spec(spec: StructuredOutput) -> None:
    """Shape checks that need no grammar engine; InvalidRequestError naming
    the OpenAI field otherwise."""
    if spec.whitespace_pattern is not None and (spec.kind not in ("json_object", "json_schema")
                                                or not isinstance(spec.whitespace_pattern, str)):
        raise InvalidRequestError(f"{spec.param}: a whitespace pattern (a regex) applies to JSON only",
                                  param=spec.param)
    if spec.kind == "json_object":
        return
    if spec.kind in ("regex", "grammar"):
        text = spec.regex if spec.kind == "regex" else spec.grammar
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"{spec.param} must be a non-empty {spec.kind}", param=spec.param)
        if len(text) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"{spec.param}: at most {MAX_GRAMMAR_CHARS} characters", param=spec.param)
        return
    if spec.kind == "choice":
        if not spec.choices or len(spec.choices) > MAX_CHOICES:
            raise InvalidRequestError(f"{spec.param} must list 1 to {MAX_CHOICES} strings", param=spec.param)
        if any(not isinstance(c, str) or not c for c in spec.choices):
            raise InvalidRequestError(f"{spec.param}: every choice must be a non-empty string", param=spec.param)
        if sum(len(c) for c in spec.choices) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"{spec.param}: at most {MAX_GRAMMAR_CHARS} characters in all",
                                      param=spec.param)
        return
    if spec.kind == "json_schema":
        if not isinstance(spec.json_schema, dict):
            raise InvalidRequestError(
                "response_format.json_schema.schema must be a JSON Schema object", param="response_format"
            )
        return
    if spec.kind != "tool_calls":
        raise InvalidRequestError(
            f"unknown structured output kind {spec.kind!r} (json_object, json_schema, tool_calls, regex, choice, "
            "grammar)",
            param="response_format",
        )
    if not spec.tools:
        raise InvalidRequestError("tools must name at least one function", param="tools")
    if len(spec.tools) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools", param="tools")
    names = [t.name for t in spec.tools]
    for index, tool in enumerate(spec.tools):
        if not isinstance(tool.name, str) or not TOOL_NAME.match(tool.name):
            raise InvalidRequestError(
                f"tools[{index}].function.name must be 1-64 letters, digits, '_', '-' or '.'",
                param=f"tools[{index}].function.name",
            )
        if tool.parameters is not None and not isinstance(tool.parameters, dict):
            raise InvalidRequestError(
                f"tools[{index}].function.parameters must be a JSON Schema object",
                param=f"tools[{index}].function.parameters",
            )
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: function names must be unique", param="tools")
    if spec.auto and spec.tool_choice is not None:
        raise InvalidRequestError("tool_choice 'auto' cannot name a function", param="tool_choice")
    if spec.json_schema is not None and (not spec.auto or not isinstance(spec.json_schema, dict)):
        raise InvalidRequestError("response_format with tools: a JSON Schema object, with tool_choice 'auto'",
                                  param="response_format")
    if spec.tool_choice is not None and spec.tool_choice not in names:
        raise InvalidRequestError(
            f"tool_choice names function {spec.tool_choice!r}, which is not in tools", param="tool_choice"
        )


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's packed mask [R, W] int32 on the CPU (bit j of word i:
    token 32 i + j is allowed) -> allowed [R, vocab_size] bool. Tokens past
    32 W (a model vocabulary larger than the tokenizer's) are not allowed.

    numpy's unpackbits reads the words' bytes in memory order, which is the
    token order on little-endian machines (x86, ARM): one pass over the bytes,
    ~40x cheaper than shifting int32 words in torch."""
    bits = np.unpackbits(bitmask.contiguous().numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits).view(torch.bool)
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls in a completed tool-call answer (see tool_call_schema); None
    when the text is not such a list (a stop string cut it, say).

    Each call's `arguments` is the model's own text of its arguments value,
    exactly as written in `text` (validated: the whole text parses), not a
    re-serialization: a streamed answer sends that text in fragments as it is
    generated, and the fragments must add up to the arguments of the whole
    answer. Under the grammar the two differ only where JSON lets the same
    value be written several ways (`1.00`, `"\\u0009"`, an open object's
    key order or repeated key); a client's JSON parser reads both the same."""
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None
    if not all(isinstance(call, dict) and isinstance(call.get("name"), str) for call in calls):
        return None
    return [ToolCall(call["name"], written.get("arguments", "{}"))
            for call, written in zip(calls, written_calls(text), strict=True)]


JSON_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def written_calls(text: str) -> list[dict[str, str]]:
    """The members of each call object in `text` (valid JSON: one call's
    object or a list of them) as written: key -> the value's own text. A key
    written twice keeps its last value, as json.loads reads it."""
    index = JSON_SPACE.match(text).end()
    if text[index] == "{":
        return [_written_members(text, index)[0]]
    calls, index = [], JSON_SPACE.match(text, index + 1).end()
    while text[index] != "]":
        members, index = _written_members(text, index)
        calls.append(members)
        index = JSON_SPACE.match(text, index).end()
        if text[index] == ",":
            index = JSON_SPACE.match(text, index + 1).end()
    return calls


def _written_members(text: str, index: int) -> tuple[dict[str, str], int]:
    """The object at text[index] ("{"): its members as written, and where it ends."""
    members: dict[str, str] = {}
    index = JSON_SPACE.match(text, index + 1).end()
    while text[index] != "}":
        key, index = json.decoder.scanstring(text, index + 1)
        index = JSON_SPACE.match(text, index).end() + 1  # past ":"
        start = JSON_SPACE.match(text, index).end()
        _, index = _DECODER.raw_decode(text, start)
        members[key] = text[start:index]
        index = JSON_SPACE.match(text, index).end()
        if text[index] == ",":
            index = JSON_SPACE.match(text, index + 1).end()
    return members, index + 1


class CallListScanner:
    """Follows a tool-call answer's JSON character by character and says when
    a call in the list repeats an earlier one exactly. A small model forced
    into an open-ended list of calls (tool_choice "required" with parallel
    calls, OpenAI's default) tends to write the same call again and again
    until max_tokens, and the client then gets text, not calls; the
    grammar cannot forbid a repeat, so the request ends at the first one
    with the calls before it (`calls`).

    A repeat is a call whose text, from its "{" to its "}", is exactly an
    earlier call's: the gateway streams a call's arguments as they are
    written and holds back only a call that is still a prefix of an earlier
    call's text (server.generation.CallStream), so the two must agree on
    what a repeat is, character for character. A comparison of parsed values
    would not: the grammar lets one value be written several ways (`1.0` and
    `1.00`, `"\\t"` and `"\\u0009"`, an open object's keys in any order),
    and such a call, already streamed, would then be dropped. A model caught
    in a loop writes the same text each time (greedy decoding does), so the
    loop still ends at its first repeat; two calls written differently are
    both kept, as different calls."""

    def __init__(self):
        self.text = ""
        self.depth = 0  # brackets and braces open outside strings
        self.in_string = False
        self.escaped = False
        self.calls: list[ToolCall] | None = None  # set once a call repeats: the list without the repeat
        self._start = 0  # where the call being written opens in `text`
        self._ends: list[int] = []  # where each complete call of the list ends in `text`
        self._seen: set[str] = set()  # each call so far, as written

    def feed(self, text: str) -> bool:
        """Takes the answer's next text; whether a call has just repeated.
        The first repeat ends the answer: later text changes nothing."""
        if self.calls is not None:
            return False
        for char in text:
            self.text += char
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                continue
            if char == '"':
                self.in_string, self.escaped = True, False
            elif char in "[{":
                self.depth += 1
                if char == "{" and self.depth == 2:
                    self._start = len(self.text) - 1
            elif char in "]}":
                self.depth -= 1
                if char == "}" and self.depth == 1 and self.text.lstrip(LEADING_SPACE).startswith("["):
                    if self._repeated():
                        return True
        return False

    def _repeated(self) -> bool:
        self._ends.append(len(self.text))
        call = self.text[self._start:]
        if call not in self._seen:
            self._seen.add(call)
            return False
        before = self.text[: self._ends[-2]].lstrip(LEADING_SPACE) + "]"  # the calls before it, as written
        self.calls = parse_tool_calls(before)
        return self.calls is not None


def shortened(message: str, limit: int = 500) -> str:
    """An error message cut to `limit` characters (a compile error may quote
    a whole grammar)."""
    return message if len(message) <= limit else message[:limit] + "..."


# ---- matchers (llguidance) ------------------------------------------------
def parser_error(matcher) -> str:
    """An llguidance matcher's error, without its "<non-verbose/>" marker."""
    return matcher.get_error().replace("<non-verbose/>", "").strip()


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, spec: StructuredOutput, matcher, decode):
        self.spec = spec
        self._matcher = matcher
        self._decode = decode  # token ids -> text
        self.error: str | None = None
        # tool_choice "auto" with free text: whether the answer chose text
        # (None until its first character after whitespace), and its text so far
        self.chose_text: bool | None = None
        self._opening = ""
        # An open-ended list of calls: watched for a call that repeats (CallListScanner).
        many = spec.kind == "tool_calls" and spec.tool_choice is None and spec.parallel_tool_calls
        self._calls = CallListScanner() if many else None
        self.repeated = False  # a call repeated: the answer ends with the calls before it
        self.slow_steps = 0  # steps whose mask took over MAX_MASK_SECONDS (StructuredOutputs.allowed_tokens)

    @property
    def done(self) -> bool:
        """The grammar is complete: no further token but end-of-sequence fits."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def consume(self, token_id: int) -> None:
        """Advances by the chosen token (legal by construction); a token the
        grammar refuses records an error instead of raising."""
        if self.error is None and not self._matcher.consume_token(token_id):
            self.fail(f"the grammar refused token {token_id}: {parser_error(self._matcher)}")
        elif self.error is None and self._matcher.is_error():
            self.fail(parser_error(self._matcher))
        if self.spec.free_text and self.chose_text is None:
            self._opening += self._decode([token_id])
            first = self._opening.lstrip(LEADING_SPACE)
            if first:
                self.chose_text = not first.startswith(self.spec.call_openers)

    def scan(self, text: str) -> None:
        """Takes the answer's next text, whole characters (the request's
        incremental detokenizer: the scanner compares and returns the calls'
        own text, exactly), for an open-ended list of calls' repeat check."""
        if self._calls is not None and self.error is None and not self.chose_text and text:
            self.repeated = self._calls.feed(text)

    def write_mask(self, address: int, size: int) -> bool:
        """Writes the packed mask of legal next tokens at `address` (size
        bytes, llguidance's layout); False when no token is legal."""
        self._matcher.unsafe_compute_mask_ptr(address, size)
        return not self._matcher.is_error()

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """The legal next tokens [vocab_size] bool (for a sampling filter that
        must see them before the engine's own mask; StructuredOutputs.allowed_tokens
        computes a whole step's masks at once)."""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.int32)
        return unpack_bitmask(torch.from_numpy(words.copy())[None, :], vocab_size)[0]

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
            logger.warning("structured output failed: %s", message)

    def tool_calls(self, token_ids: Sequence[int]) -> list[ToolCall] | None:
        """The parsed calls of a completed tool-call answer; None otherwise."""
        if self.spec.kind != "tool_calls" or self.error is not None:
            return None
        if self.repeated:
            return self._calls.calls
        text = self._decode(list(token_ids)).lstrip(LEADING_SPACE)
        if self.spec.auto and not text.startswith(self.spec.call_openers):
            return None  # the model chose to answer in text (or in the response_format's JSON)
        return parse_tool_calls(text)


class StructuredOutputs:
    """Compiles StructuredOutputs against the engine's tokenizer (LRU cache of
    compiled grammars: a matcher for a cached grammar is a cheap deep copy)
    and computes the token masks of a step. One per engine; the llguidance
    tokenizer (~0.5 s to build) is made at the first structured request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._ll_tokenizer = None
        # The worker's tokenizer thread compiles a request's grammar (`compile`,
        # from prepare_chat) while the decode loop reads the cache: a lock over
        # the tokenizer's build and the cache (not the compiles themselves).
        self._lock = threading.RLock()

    def _llg(self):
        """The llguidance module, with the tokenizer built on first use."""
        import llguidance
        import llguidance.hf

        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=max(self.vocab_size, len(self.tokenizer)), eos_token=self.stop_token_ids
                )
        return llguidance

    def start(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for the request. InvalidRequestError (naming
        response_format, tools or tool_choice) for a schema that does not compile."""
        check_spec(spec)
        if spec.kind in TEXT_KINDS:
            schema, options = None, {}
            key = json.dumps([spec.kind, spec.regex, list(spec.choices), spec.grammar], ensure_ascii=False)
        else:
            options = compile_options(spec)
            try:
                schema = json_schema_for(spec)
                key = json.dumps([schema, options, spec.auto, spec.json_schema if spec.auto else None],
                                 ensure_ascii=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidRequestError(f"{spec.param}: the schema is not plain JSON: {exc}",
                                          param=spec.param) from None
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
        if template is None:
            # Outside the lock: a long compile in the tokenizer thread must not hold up the decode loop's lookups.
            template = self._compile(spec, schema, options)
            with self._lock:
                self._compiled[key] = template
                while len(self._compiled) > self.cache_size:
                    self._compiled.popitem(last=False)
        return GrammarMatcher(spec, template.deep_copy(), self._ll_tokenizer.decode_str)

    def compile(self, spec: StructuredOutput) -> None:
        """Compiles `spec` into the cache (the worker's tokenizer thread does,
        as it prepares the request, so the decode loop only copies it).
        InvalidRequestError as `start`."""
        self.start(spec)

    def _compile(self, spec: StructuredOutput, schema: dict[str, Any] | None, options: dict[str, Any]):
        if spec.kind in TEXT_KINDS:
            compiled = self._compile_grammar(lambda llg: text_grammar(llg, spec), TEXT_LEXER_FUEL)
            if isinstance(compiled, str):
                raise InvalidRequestError(f"{spec.param}: invalid {spec.kind}: {shortened(compiled)}",
                                          param=spec.param)
            return compiled
        if spec.auto:
            answer = tightened(spec.json_schema) if spec.json_schema is not None else None
            compiled = self._compile_grammar(lambda llg: llg.LLMatcher.grammar_from_lark(
                optional_calls_grammar(schema, options, answer)))
        else:
            compiled = self._compile_schema(schema, options)
        if isinstance(compiled, str):
            raise self._compile_error(spec, schema, options, compiled)
        logger.debug("compiled a %s grammar", spec.kind)
        return compiled

    def _compile_error(self, spec: StructuredOutput, schema: dict[str, Any], options: dict[str, Any],
                       error: str) -> InvalidRequestError:
        """The 400 for a grammar that does not compile, naming the client's
        own schema where one fails alone (and quoting that error, in the
        client's own terms: not the tool-call schema or grammar it was put in)."""
        parts: list[tuple[str, dict[str, Any] | None]] = []
        if spec.kind == "tool_calls":
            parts = [(f"tools[{index}].function.parameters", tool.parameters) for index, tool in enumerate(spec.tools)]
            if spec.auto and spec.json_schema is not None:
                parts.append(("response_format", spec.json_schema))
        for param, part in parts:
            alone = self._compile_schema(part, options) if part else None
            if isinstance(alone, str):
                return InvalidRequestError(f"{param}: invalid JSON Schema: {shortened(alone)}", param=param)
        if spec.auto:  # the calls alone, as JSON Schema: its error, not the grammar's
            alone = self._compile_schema(schema, options)
            error = alone if isinstance(alone, str) else error
        return InvalidRequestError(f"{spec.param}: invalid JSON Schema: {shortened(error)}", param=spec.param)

    def _compile_schema(self, schema: dict[str, Any], options: dict[str, Any]):
        """The compiled LLMatcher (in its start state), or the compile error (str)."""
        return self._compile_grammar(lambda llg: llg.LLMatcher.grammar_from_json_schema(schema, defaults=options))

    def _compile_grammar(self, make_grammar, lexer_fuel: int | None = None):
        """make_grammar(llguidance) -> grammar text, compiled: the LLMatcher
        (in its start state), or the compile error (str)."""
        llguidance = self._llg()
        try:
            grammar = make_grammar(llguidance)
        except (ValueError, TypeError) as exc:
            return str(exc)
        limits = llguidance.LLParserLimits(verbose_errors=False, initial_lexer_fuel=lexer_fuel)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            return parser_error(matcher) or "the grammar does not compile"
        # Some grammars compile but cannot take a first step (a schema that is
        # only a reference to itself): refused now, not after a 200.
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            return parser_error(probe) or "the grammar allows no first token"
        return matcher

    def allowed_tokens(self, matchers: Sequence[GrammarMatcher]) -> torch.Tensor:
        """Legal next tokens of each matcher: [R, V] bool. A matcher that
        fails or allows nothing (a schema the parser cannot follow, say one
        with no finite instance) is marked failed and gets every token, so
        sampling stays defined; its request then ends with an error naming
        its constraint."""
        self._llg()
        words = (self._ll_tokenizer.vocab_size + 31) // 32
        bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
        # Each matcher fills its row of the (contiguous, CPU) buffer, ~8 us a
        # row here. In sequence: llguidance's thread pool saves little at
        # these sizes and its threads would compete with torch's for the cores.
        failed = []
        for row, matcher in enumerate(matchers):
            started = time.perf_counter()
            if not matcher.write_mask(bitmask.data_ptr() + row * words * 4, words * 4):
                # The parser failed (a schema it cannot follow); its row holds whatever it left.
                matcher.fail(parser_error(matcher._matcher) or "the grammar failed")
                failed.append(row)
            elif (took := time.perf_counter() - started) > MAX_MASK_SECONDS:
                matcher.slow_steps += 1
                if matcher.slow_steps >= MASK_STRIKES:
                    # Every stream waits for it: the request ends rather than stall them all step after step.
                    matcher.fail(f"the constraint is too costly to follow: choosing a token took {took:.2f} s "
                                 f"(at most {MAX_MASK_SECONDS} s); simplify it (large counted repetitions, say)")
                    failed.append(row)
        allowed = unpack_bitmask(bitmask, self.vocab_size)
        empty = ~allowed.any(dim=1)
        if failed:
            empty[failed] = True
        if bool(empty.any()):
            for row in empty.nonzero().flatten().tolist():
                matchers[row].fail(matchers[row].error or "the grammar allows no next token")
            allowed[empty] = True
        return allowed
