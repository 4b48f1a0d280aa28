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


def sequence_log_probs(token_logits: torch.Tensor, labels: torch.Tensor, row_of_token: torch.Tensor,
                       rows: int) -> torch.Tensor:
    """Sum of log p(label) per sequence, over answer tokens only.

    token_logits [N, V] are the logits that predict labels [N]; row_of_token
    [N] says which of the `rows` sequences each token belongs to -> [rows].
    Only answer positions are passed in, so the vocabulary projection and
    the softmax never run over prompt tokens; cross_entropy avoids
    materialising a [N, V] log-softmax.
    """
    token_log_probs = -F.cross_entropy(token_logits.float(), labels, reduction="none")
    return torch.zeros(rows, dtype=token_log_probs.dtype, device=token_log_probs.device).index_add(
        0, row_of_token, token_log_probs
    )


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
