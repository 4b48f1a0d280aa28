"""The language-model head applied by the engine rather than inside the model.

PAD only needs the reward rows' logits at the base row's top-k candidates,
so a reward row costs K dot products instead of a full vocabulary matmul
(on a 135M model the vocabulary projection is a fifth of the FLOPs).
"""

from __future__ import annotations

import torch


class OutputHead:
    """logits = (hidden @ W.T + b) * scale, soft-capped where the model says so."""

    def __init__(self, model):
        linear = model.get_output_embeddings()
        config = model.config.get_text_config()
        self.weight = linear.weight  # [V, H]
        self.bias = linear.bias
        self.scale = getattr(config, "logit_scale", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, V]."""
        return self._finish(torch.nn.functional.linear(hidden, self.weight, self.bias))

    def at(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """hidden [M, H], token_ids [M, K] -> logits of those tokens [M, K]."""
        rows = self.weight[token_ids]  # [M, K, H]
        logits = torch.einsum("mh,mkh->mk", hidden, rows)
        if self.bias is not None:
            logits = logits + self.bias[token_ids]
        return self._finish(logits)
