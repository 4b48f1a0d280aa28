"""The reward-adapter folder format, read and written here only.

A reward adapter is a peft LoRA folder (`adapter_config.json`,
`adapter_model.safetensors`) that `pad train` completes with
`pad_training.json`: its training settings, pair counts, metrics and the
fingerprint of the base model it was trained on. Serving reads the LoRA
weights (refusing what batched multi-LoRA does not compute) and refuses an
adapter whose fingerprint names another base model. `pad train` writes the
summary through `write_training_summary`; runners load adapters through
`load_adapter`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

from pad_core.errors import ModelLoadError
from pad_core.lora import LoraPair

TRAINING_FILE = "pad_training.json"
PEFT_CONFIG_FILE = "adapter_config.json"
FINGERPRINT_FIELD = "base_model_fingerprint"


def base_model_fingerprint(model, tokenizer) -> str:
    """Identifies the base weights' architecture and vocabulary, so an adapter
    trained on another base model is refused at load time. (Stable across
    versions: adapters already trained carry it.)"""
    config = model.config.get_text_config()
    fields = {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "vocab": sorted(tokenizer.get_vocab().items())[:: max(1, len(tokenizer) // 512)],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def write_training_summary(folder: Path, summary: dict, fingerprint: str) -> dict:
    """Writes `pad_training.json` into an adapter folder; returns what it wrote
    (the summary with the base model's fingerprint)."""
    written = {**summary, FINGERPRINT_FIELD: fingerprint}
    (Path(folder) / TRAINING_FILE).write_text(json.dumps(written, indent=2))
    return written


def read_training_summary(folder: Path) -> dict | None:
    """`pad_training.json` of an adapter folder; None for an adapter made
    elsewhere (no summary)."""
    path = Path(folder) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(summary, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return summary


def check_adapter_base(name: str, folder: Path, fingerprint: Callable[[], str] | None) -> None:
    """Refuses an adapter that `pad train` made for another base model.
    fingerprint: gives the served base model's, asked only when the adapter
    names one (computing it reads the vocabulary); None: not known, nothing
    to check. An adapter without a summary gets the shape checks of
    `MultiLora.add` only."""
    summary = read_training_summary(folder)
    expected = None if summary is None else summary.get(FINGERPRINT_FIELD)
    if fingerprint is not None and expected and expected != fingerprint():
        raise ModelLoadError(
            f"reward adapter {name!r} at {folder} was trained on a different base model than the one being served"
        )


def read_lora_weights(name: str, folder: Path) -> dict[str, LoraPair]:
    """The adapter's LoRA weights by target module name (as in the base
    model's `named_modules()`), scaling folded into B. Refuses what batched
    multi-LoRA does not compute: DoRA, trained biases, extra saved modules."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    try:
        config = LoraConfig.from_pretrained(str(folder))
        state = load_peft_weights(str(folder), device="cpu")
    except (ValueError, OSError, TypeError) as exc:
        raise ModelLoadError(f"reward adapter {name!r}: cannot read {folder}: {exc}") from exc
    unsupported = [
        label
        for label, used in (
            ("DoRA", config.use_dora),
            ("trained biases", config.bias != "none"),
            ("modules_to_save", bool(config.modules_to_save)),
            ("alpha_pattern", bool(config.alpha_pattern)),
        )
        if used
    ]
    if unsupported:
        raise ModelLoadError(f"reward adapter {name!r} uses {', '.join(unsupported)}, which serving does not support")
    downs, ups = {}, {}
    for key, tensor in state.items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind == "A.weight":
            downs[module] = tensor
        elif kind == "B.weight":
            ups[module] = tensor
        else:
            raise ModelLoadError(f"reward adapter {name!r}: unexpected weight {key!r} (only LoRA A/B of linear layers are served)")
    if not downs or downs.keys() != ups.keys():
        raise ModelLoadError(f"reward adapter {name!r}: LoRA A and B weights do not match up")
    pairs = {}
    for module, down in downs.items():
        rank = down.shape[0]
        scaling = config.lora_alpha / (math.sqrt(rank) if config.use_rslora else rank)
        pairs[module] = LoraPair(down, ups[module] * scaling)
    return pairs


def load_adapter(name: str, folder: Path, fingerprint: Callable[[], str] | None) -> dict[str, LoraPair]:
    """Checks an adapter folder (a peft adapter, trained on this base model)
    and reads its LoRA weights. Raises ModelLoadError."""
    folder = Path(folder).expanduser()
    if not (folder / PEFT_CONFIG_FILE).is_file():
        raise ModelLoadError(f"reward adapter {name!r}: {folder} is not a peft adapter folder")
    check_adapter_base(name, folder, fingerprint)
    return read_lora_weights(name, folder)
