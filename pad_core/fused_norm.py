"""RMSNorm in one kernel for the graphed decode step.

Why: transformers' Llama-family RMSNorm is eight kernels in half precision
(upcast, square, mean, add epsilon, rsqrt, scale, downcast, weight), two
per layer and one at the end. A decode step of a small model is bound by
how many kernels it runs, not by the bytes it reads: on an H200 the
SmolLM2-135M step (about 1,400 kernels by its operators counted on the CPU,
~490 of them in its 61 norms) took
3.5 ms at batch 1 inside a CUDA graph, where its weights take 0.1 ms to
read. `torch.nn.functional.rms_norm` is one kernel on CUDA
(`aten::_fused_rms_norm`, torch >= 2.8) and the same function elsewhere.

Only norms whose forward is transformers' RMSNorm, code for code, are
swapped (Llama's and its copies: Mistral, Qwen2, SmolLM...); others
(Gemma's `1 + weight`, say) keep theirs. The fused kernel rounds once where
transformers rounds twice (before and after the weight) and sums in
another order, so the results differ in the last bits: the cuda backend
uses it in half precision, where kernels of other batch shapes already
round differently, and keeps transformers' norm in float32, where it
chooses the transformers runner's tokens exactly.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

HALF_PRECISION = (torch.float16, torch.bfloat16)


def _code_of(function) -> tuple:
    code = function.__code__
    return code.co_code, code.co_consts, code.co_names, code.co_varnames


_TRANSFORMERS_RMS_NORM = _code_of(LlamaRMSNorm.forward)


def is_transformers_rms_norm(module: torch.nn.Module) -> bool:
    """Whether the module's class computes transformers' RMSNorm (the same
    code as LlamaRMSNorm.forward, whatever the class is called)."""
    forward = getattr(type(module), "forward", None)
    return (
        getattr(forward, "__code__", None) is not None
        and _code_of(forward) == _TRANSFORMERS_RMS_NORM
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:  # transformers' promotes; the fused kernel takes one dtype
        return type(self).forward(self, hidden_states)
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def use_fused_rms_norm(model: torch.nn.Module, enabled: bool = True) -> int:
    """Swaps (enabled) or restores (not enabled) the forward of every
    transformers RMSNorm in the model; returns how many there are."""
    norms = [module for module in model.modules() if is_transformers_rms_norm(module)]
    for norm in norms:
        if enabled:
            norm.forward = types.MethodType(_fused_forward, norm)
        else:
            norm.__dict__.pop("forward", None)  # the class's forward again
    return len(norms)
