"""Decode attention that reads each KV head once (grouped-query attention
without repeating K and V).

Why: with an attention mask, transformers' SDPA path repeats every KV head
for the query heads that share it (`repeat_kv`) before calling SDPA, since
PyTorch's mask-taking kernels do not all take grouped heads. In a decode
step over the KV pool that is a copy of the whole cache read, every layer,
every step: for SmolLM2-135M (9 query heads, 3 KV heads) three times the
bytes the step needs to read. Here the query heads of a group are stacked
against their one KV head and attention is two batched matmuls and a
float32 softmax, which reads K and V once and records in a CUDA graph.

Prompts (more than one query per row) and masks of other kinds go to
transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

logger = logging.getLogger(__name__)

GROUPED_DECODE = "pad_grouped_decode"


def grouped_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                             scaling: float) -> torch.Tensor:
    """One query per row: query [B, H, 1, D], key / value [B, KV, L, D]
    (H a multiple of KV; query head h reads KV head h // (H / KV), as
    transformers' repeat_kv), allowed [B, 1, 1, L] bool -> output [B, 1, H, D]."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # [B, KV, G, D]
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # [B, KV, G, L]
    # [B, 1, 1, L] over the KV heads and the group; one kernel (masked_fill(~allowed) is two, every layer)
    scores = torch.where(allowed, scores, float("-inf"))
    weights = scores.softmax(dim=-1).to(value.dtype)
    output = torch.matmul(weights, value)  # [B, KV, G, D]
    return output.reshape(batch, 1, heads, head_dim)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention interface: grouped decode attention for one
    query per row under a boolean mask, transformers' SDPA otherwise."""
    decoding = query.shape[2] == 1 and attention_mask is not None and attention_mask.dtype == torch.bool
    if not decoding or dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return grouped_decode_attention(query, key, value, attention_mask, scale), None


def use_grouped_decode_attention(model: torch.nn.Module) -> bool:
    """Switches a model whose attention is SDPA to this module's attention
    (the same results; decode steps read K and V once). Returns whether it
    did: a model with another attention keeps it."""
    config = model.config.get_text_config()
    if config._attn_implementation not in ("sdpa", GROUPED_DECODE):
        return False
    try:  # the masks transformers builds for it are SDPA's (boolean)
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # a transformers without mask interfaces: keep its SDPA attention
        logger.info("this transformers has no AttentionMaskInterface; decode attention stays SDPA's")
        return False
    AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)
    AttentionInterface.register(GROUPED_DECODE, attention)
    set_attention_implementation(model, GROUPED_DECODE)
    return True


def set_attention_implementation(model: torch.nn.Module, name: str) -> None:
    """Sets the attention implementation (a name transformers knows) on the
    model's config and its text config (the same object for most models)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config._attn_implementation = name
