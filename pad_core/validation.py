"""Bounds of every request parameter, checked on the request types
(`pad_core.types`, their `verify` methods) by the gateway, the engine and the
store alike. Torch-free: the gateway imports it.

Like vLLM's `SamplingParams._verify_args`, each check names the parameter
and its legal range, and raises `InvalidRequestError` (a 400). The ranges are
those of the OpenAI API where it has one; integers fit in int64 (msgpack,
SQLite and torch seeds all stop there), floats are finite, and text is valid
Unicode (a lone surrogate such as "\\ud800" cannot be encoded to UTF-8, so it
would fail the IPC, the tokenizer or the database later, as a 500).
"""

from __future__ import annotations

import math
from typing import Any

from pad_core.errors import InvalidRequestError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1  # PostgreSQL INTEGER columns (choice indices)

MAX_TEMPERATURE = 2.0
# Below this temperature a request is decoded greedily, as vLLM does
# (its _SAMPLING_EPS): softmax(s / T) is a one-hot vector to float precision.
TEMPERATURE_FLOOR = 1e-5
MAX_PENALTY = 2.0
# vLLM's repetition_penalty, in [0.01, 2]: seen logits are divided or multiplied by it, and a
# near-zero divisor would overflow them to infinity.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 2.0
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
MAX_LOGIT_BIAS_VALUE = 100.0  # |bias| (OpenAI's range)
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_BAD_WORDS = 256  # vLLM's bad_words (it sets no limit; each costs a check per step)
MAX_BAD_WORD_CHARS = 1000
MAX_ALLOWED_TOKEN_IDS = 2**20  # vLLM's allowed_token_ids: more than any vocabulary
MAX_CACHE_SALT_CHARS = 256  # vLLM's cache_salt (a tenant's key, not text)
MAX_DOCUMENTS = 256  # vLLM's chat documents (the context length bounds their text anyway)
MAX_CHOICES = 16  # n
# |pad.weight| and |preference weight|. PAD's grid tops out at w = 8; far
# larger weights only saturate the choice, and 1e308 overflows float32.
MAX_WEIGHT = 100.0


def check_int(value: Any, param: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """An integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{param} must be an integer", param=param, code="invalid_type")
    if not low <= value <= high:
        raise InvalidRequestError(f"{param} must be an integer in [{low}, {high}]", param=param, code="invalid_value")
    return value


def check_float(value: Any, param: str, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite number in [low, high] ((low, high] with low_open); ints are
    accepted, however large (a 400-digit integer is refused, not an OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{param} must be a number", param=param, code="invalid_type")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        raise InvalidRequestError(f"{param} must be a finite number in {interval}", param=param, code="invalid_value")
    return number


def check_text(value: Any, param: str, *, max_chars: int | None = None, code: str | None = None) -> str:
    """A string that is valid Unicode (encodable as UTF-8), of at most max_chars."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{param} must be a string", param=param, code="invalid_type")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequestError(
            f"{param} has {len(value)} characters, at most {max_chars} allowed", param=param, code=code
        )
    if not is_valid_unicode(value):
        raise InvalidRequestError(f"{param} is not valid Unicode (a lone surrogate)", param=param, code="invalid_text")
    return value


def check_json(value: Any, param: str) -> Any:
    """A plain JSON value (a JSON Schema, say) that can cross the IPC: dicts
    with string keys, lists, strings of valid Unicode, finite floats, and
    integers within int64 (msgpack stops at 64 bits: a schema's
    `"minimum": 2**64` must be a 400, not an OverflowError)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                check_text(key, param)
                stack.append(child)
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, str):
            check_text(node, param)
        elif isinstance(node, bool) or node is None:
            continue
        elif isinstance(node, int):
            if not INT64_MIN <= node <= INT64_MAX:
                raise InvalidRequestError(f"{param}: the integer {str(node)[:40]} is outside int64",
                                          param=param, code="invalid_value")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise InvalidRequestError(f"{param}: numbers must be finite", param=param, code="invalid_value")
        else:
            raise InvalidRequestError(f"{param} must be plain JSON", param=param, code="invalid_type")
    return value


def is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{param} must be a boolean", param=param, code="invalid_type")
    return value
