"""PAD's personalized reward modeling objective, as pure tensor functions.

The PersRM pi_theta sees the prompt WITH the preference; the reference is
the frozen base model WITHOUT it. The implicit reward of an answer y is
beta * (log pi_theta(y | x, p) - log pi_ref(y | x)), and the loss is the
Bradley-Terry (DPO) loss on chosen vs rejected answers:

    L = -log sigmoid(beta * [(lp_c - ref_c) - (lp_r - ref_r)])

so at decoding time log_softmax(l_rm) - log_softmax(l_base) is exactly the
token-level reward the adapter was trained to express.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLoss:
    loss: torch.Tensor  # scalar, mean over pairs
    accuracy: torch.Tensor  # share of pairs with chosen reward > rejected reward
    margin: torch.Tensor  # mean reward margin


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label_t) over the answer tokens.

    logits [B, T, V] predicting labels [B, T] (already shifted), mask [B, T]
    1 on answer tokens -> [B].
    """
    log_probs = torch.gather(logits.float().log_softmax(dim=-1), 2, labels.unsqueeze(-1)).squeeze(-1)
    return (log_probs * mask).sum(dim=-1)


def pad_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> PairLoss:
    """All arguments are sequence log-probabilities [B]."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    return PairLoss(
        loss=-F.logsigmoid(margin).mean(),
        accuracy=(margin > 0).float().mean(),
        margin=margin.mean(),
    )
