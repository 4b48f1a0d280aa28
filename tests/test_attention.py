"""Grouped decode attention (pad_core/attention.py): the same outputs as
transformers' SDPA attention with repeated KV heads, for any grouping, mask
and dtype; prompts go to SDPA unchanged; the pool runner switches SDPA models
to it and leaves other attentions alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pad_core.attention import GROUPED_DECODE, attention, grouped_decode_attention, use_grouped_decode_attention
from pad_core.slot_runner import SlotRunner
from pad_core.testing import tiny_model


class Attention(torch.nn.Module):
    """What transformers' SDPA attention reads from the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def inputs(batch, kv_heads, groups, length, head_dim, seed, dtype=torch.float32, queries=1):
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    query = torch.randn(batch, queries, heads, head_dim, generator=generator, dtype=dtype).transpose(1, 2)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator, dtype=dtype)
    value = torch.randn(batch, kv_heads, length, head_dim, generator=generator, dtype=dtype)
    seen = torch.randint(0, length, (batch,), generator=generator)
    allowed = (torch.arange(length)[None, :] <= seen[:, None])[:, None, None, :]
    return query, key, value, allowed


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), kv_heads=st.integers(1, 4), groups=st.integers(1, 4), length=st.integers(1, 70),
       head_dim=st.sampled_from([8, 16, 64]), seed=st.integers(0, 1000))
def test_grouped_decode_equals_sdpa_with_repeated_heads(batch, kv_heads, groups, length, head_dim, seed):
    query, key, value, allowed = inputs(batch, kv_heads, groups, length, head_dim, seed)
    expected, _ = sdpa_attention_forward(Attention(groups), query, key, value, allowed, scaling=head_dim**-0.5)
    torch.testing.assert_close(grouped_decode_attention(query, key, value, allowed, head_dim**-0.5), expected,
                               atol=1e-5, rtol=1e-5)


def test_bfloat16_stays_within_sdpa_rounding():
    query, key, value, allowed = inputs(8, 3, 3, 300, 64, 0, torch.bfloat16)
    expected, _ = sdpa_attention_forward(Attention(3), query, key, value, allowed, scaling=0.125)
    exact, _ = sdpa_attention_forward(Attention(3), *(t.float() for t in (query, key, value)), allowed, scaling=0.125)
    ours = grouped_decode_attention(query, key, value, allowed, 0.125)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().max() <= 2 * (expected.float() - exact).abs().max() + 1e-2


def test_prompts_and_masks_of_other_kinds_go_to_sdpa():
    query, key, value, allowed = inputs(2, 2, 2, 5, 8, 1, queries=5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    expected, _ = sdpa_attention_forward(Attention(2), query, key, value, causal, scaling=0.3)
    assert torch.equal(attention(Attention(2), query, key, value, causal, scaling=0.3)[0], expected)
    query, key, value, allowed = inputs(2, 2, 2, 5, 8, 1)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    expected, _ = sdpa_attention_forward(Attention(2), query, key, value, additive, scaling=0.3)
    assert torch.equal(attention(Attention(2), query, key, value, additive, scaling=0.3)[0], expected)


def test_the_pool_runner_switches_sdpa_models_and_keeps_their_hidden_states(tokenizer):
    model = tiny_model(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        before = model.model(input_ids=ids).last_hidden_state
    SlotRunner(model, slots=2, slot_tokens=64)
    assert model.config._attn_implementation == GROUPED_DECODE
    with torch.inference_mode():
        torch.testing.assert_close(model.model(input_ids=ids).last_hidden_state, before, atol=0, rtol=0)
    assert use_grouped_decode_attention(model)  # switching again is harmless


@pytest.mark.parametrize("implementation", ["eager"])
def test_other_attentions_are_left_alone(tokenizer, implementation):
    model = tiny_model(tokenizer)
    model.config._attn_implementation = implementation
    assert not use_grouped_decode_attention(model)
    SlotRunner(model, slots=2, slot_tokens=64)
    assert model.config._attn_implementation == implementation
