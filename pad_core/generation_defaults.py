"""The sampling defaults a model's creator recommends, from its
generation_config.json, as vLLM serves them (`--generation-config`,
`--override-generation-config`): a request that leaves temperature, top_p,
top_k, min_p or repetition_penalty out samples with the model's values
instead of OpenAI's (1.0, 1.0, all, 0, 1.0), and one that leaves max_tokens
out writes at most the model's max_new_tokens (and the room its prompt
leaves, as vLLM). "vllm" keeps OpenAI's defaults.

The worker reads them once at start-up (`sampling_defaults`) and sends them
with its model info; the gateway fills the requests' missing sampling
fields from them (server/openai_models.py), the engine sizes a missing
max_tokens (PadEngine._default_max_tokens)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pad_core.errors import ModelLoadError
from pad_core.validation import INT64_MAX, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY

logger = logging.getLogger(__name__)

# generation_config.json's name -> the request field it is the default of (vLLM's set).
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def model_generation_config(setting: str, model) -> dict[str, Any]:
    """The generation config the setting names: "auto", the model's own
    (transformers read its folder's generation_config.json, if any, into
    `model.generation_config`); "vllm", none; else a folder holding a
    generation_config.json. Only what differs from transformers' defaults,
    as vLLM reads it."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        config = getattr(model, "generation_config", None)
        return config.to_diff_dict() if config is not None else {}
    folder = Path(setting).expanduser()
    if not (folder / "generation_config.json").is_file():
        raise ModelLoadError(f"generation_config {setting!r} is neither 'auto', 'vllm' nor a folder holding a "
                             "generation_config.json")
    from transformers import GenerationConfig  # here: the gateway checks overrides without transformers

    try:
        return GenerationConfig.from_pretrained(folder).to_diff_dict()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the generation config in {setting!r}: {exc}") from exc


def sampling_defaults(setting: str, overrides: Mapping[str, float], model) -> dict[str, float | int]:
    """The request fields' defaults (request field -> value) from the
    setting's generation config, then `overrides` (generation_config.json
    names). A value no request could carry is a ModelLoadError naming it."""
    config = model_generation_config(setting, model)
    problem = overrides_problem(overrides)
    if problem:
        raise ModelLoadError(problem)
    found = {key: value for key, value in {**config, **overrides}.items()
             if key in SAMPLING_KEYS and value is not None}
    for key, value in found.items():
        problem = value_problem(key, value)
        if problem:
            raise ModelLoadError(problem)
    defaults = {SAMPLING_KEYS[key]: int(value) if key in WHOLE_NUMBERS else float(value)
                for key, value in found.items()}
    if defaults:
        # As vLLM warns: answers differ from OpenAI's defaults where a request leaves these out.
        logger.warning("default sampling parameters from the model's generation config (a request's own "
                       "values win; --generation-config vllm keeps OpenAI's): %s", defaults)
    return defaults


WHOLE_NUMBERS = {"top_k": -1, "max_new_tokens": 1}  # name -> the least value
RANGES = {"temperature": (0.0, MAX_TEMPERATURE), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
          "repetition_penalty": (MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)}


def override_numbers(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides with the numbers the command line gives as text
    (temperature=0.5) read as numbers; whole numbers stay whole (a float
    loses them past 2**53), anything else as it came (overrides_problem
    names it)."""
    numbers = {}
    for key, value in overrides.items():
        if isinstance(value, str):
            for read in (int, float):
                try:
                    value = read(value)
                    break
                except ValueError:
                    continue
        numbers[key] = value
    return numbers


def overrides_problem(overrides: Mapping[str, Any]) -> str | None:
    """What is wrong with override_generation_config (None: nothing):
    checked by the settings, so `pad serve` refuses it before a model loads."""
    unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
    if unknown:
        return f"override_generation_config: {', '.join(map(repr, unknown))} not among {', '.join(SAMPLING_KEYS)}"
    return next((problem for key, value in overrides.items() if (problem := value_problem(key, value))), None)


def value_problem(key: str, value: Any) -> str | None:
    """Why a generation config's value is not one a request could carry (None: it is)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"generation config {key} must be a number, not {value!r}"
    if key in RANGES:
        low, high = RANGES[key]
        return None if low <= value <= high else f"generation config {key} must be within [{low}, {high}], not {value}"
    least = WHOLE_NUMBERS[key]
    if value != int(value) or not least <= value <= INT64_MAX:
        return f"generation config {key} must be a whole number from {least} to {INT64_MAX}, not {value}"
    return None
