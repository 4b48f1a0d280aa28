"""pad_core/fused_norm.py: transformers' RMSNorms (and only those) swap to
torch's one-kernel rms_norm and back, with the same results up to rounding."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pad_core.fused_norm import is_transformers_rms_norm, use_fused_rms_norm
from pad_core.testing import tiny_model


class OnePlusWeightNorm(LlamaRMSNorm):
    """Gemma's kind: the weight is an offset from one (another formula)."""

    def forward(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states.float() * torch.rsqrt(variance + self.variance_epsilon)
        return (normed * (1.0 + self.weight.float())).to(hidden_states.dtype)


def _norms(model):
    return [m for m in model.modules() if is_transformers_rms_norm(m)]


def test_every_llama_norm_is_found_and_swapped_back(tokenizer):
    model = tiny_model(tokenizer)
    layers = model.config.num_hidden_layers
    assert use_fused_rms_norm(model) == 2 * layers + 1  # input and post-attention norms, and the final one
    assert all("forward" in norm.__dict__ for norm in _norms(model))
    assert use_fused_rms_norm(model, enabled=False) == 2 * layers + 1
    assert not any("forward" in norm.__dict__ for norm in _norms(model))


def test_a_norm_with_another_formula_is_left_alone():
    norm = OnePlusWeightNorm(8)
    assert not is_transformers_rms_norm(norm)
    holder = torch.nn.Sequential(norm, LlamaRMSNorm(8))
    assert use_fused_rms_norm(holder) == 1 and "forward" not in norm.__dict__


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_the_fused_norm_computes_transformers_norm(dtype, tolerance):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    hidden = (torch.randn(4, 3, 576) * 3).to(dtype)
    expected = norm(hidden)
    use_fused_rms_norm(norm)
    fused = norm(hidden)
    assert fused.dtype == expected.dtype == dtype and fused.shape == expected.shape
    torch.testing.assert_close(fused.float(), expected.float(), rtol=tolerance, atol=tolerance)
    use_fused_rms_norm(norm, enabled=False)
    assert torch.equal(norm(hidden), expected)  # transformers' own again, bit for bit


def test_a_model_with_fused_norms_predicts_what_it_did(tokenizer):
    model = tiny_model(tokenizer).to(torch.bfloat16)
    torch.manual_seed(1)
    for norm in _norms(model):  # initialised to ones: a norm that dropped its weight would pass
        torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    ids = torch.tensor([tokenizer.encode("How do I sleep better? Short answers, please.")])
    with torch.inference_mode():
        before = model(ids).logits.float()
        use_fused_rms_norm(model)
        after = model(ids).logits.float()
    spread = before.std().item()
    assert (after - before).abs().max().item() < 0.5 * spread  # rounding, not another model
    assert (after.argmax(-1) == before.argmax(-1)).float().mean().item() >= 0.75  # bfloat16 near-ties may flip


def test_a_norm_kept_in_float32_under_half_inputs_computes_as_transformers():
    norm = LlamaRMSNorm(16)  # float32 weight, as a model that keeps its norms in float32 has
    hidden = torch.randn(2, 16).to(torch.bfloat16)
    expected = norm(hidden)
    use_fused_rms_norm(norm)
    assert torch.equal(norm(hidden), expected) and norm(hidden).dtype == expected.dtype
