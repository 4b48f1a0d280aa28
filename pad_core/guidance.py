"""PAD guidance rule as pure tensor functions (no model, no state).

Shapes: N requests, M reward rows (one per preference, over all requests),
V vocabulary, K candidates (the largest top_k in the batch; rows with a
smaller top_k mask the extra columns out).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def prescreen_top_k(base_logits: torch.Tensor, top_k: torch.Tensor, k_max: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates of each base row.

    base_logits [N, V], top_k [N] (long, >= 1) -> candidate ids [N, K] sorted by
    base logit, and a validity mask [N, K] (column j valid iff j < top_k[n]).
    k_max: top_k's largest value when the caller knows it (else read from
    the device: a sync).
    """
    if k_max is None:
        k_max = int(top_k.max())
    _, candidate_ids = base_logits.topk(k_max, dim=-1)
    columns = torch.arange(k_max, device=base_logits.device)
    valid = columns[None, :] < top_k[:, None]
    return candidate_ids, valid


def prescreen(
    base_logits: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor | None = None, k_max: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates of each base row: its top_k tokens, minus those the base
    model finds implausible (our extension to PAD, DESIGN.md).

    A candidate a stays only if p_base(a) >= min_p * max p_base, i.e.
    l(a) - l_max >= log(min_p): a strong reward can then only choose among
    tokens that make sense to the base model, however large w is. min_p = 0
    keeps all top_k; the most likely token always stays. A token at -inf (a
    grammar forbids it, decoding.apply_token_mask) is never a candidate, even
    when fewer than top_k tokens are legal.

    base_logits [N, V], top_k [N] long, min_p [N] in [0, 1] (None: all 0)
    -> candidate ids [N, K] sorted by base logit, validity mask [N, K].
    k_max: as prescreen_top_k's.
    """
    candidate_ids, valid = prescreen_top_k(base_logits, top_k, k_max)
    forbidden = base_logits.gather(1, candidate_ids) == NEG_INF
    forbidden[:, 0] = False  # the top token stays, whatever its logit
    valid = valid & ~forbidden
    if min_p is None:  # (min_p 0 needs no branch: its floor log 0 = -inf keeps every candidate)
        return candidate_ids, valid
    candidate_logits = base_logits.gather(1, candidate_ids).float()
    gap = candidate_logits - candidate_logits[:, :1]  # [N, K], <= 0 (sorted)
    floor = torch.log(min_p.float().clamp(min=0.0, max=1.0))[:, None]  # log 0 = -inf keeps all
    plausible = gap >= floor
    plausible[:, 0] = True  # the top token, also when its logit is not finite
    return candidate_ids, valid & plausible


def masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log_softmax over the valid columns only; invalid columns get -inf."""
    return logits.masked_fill(~valid, NEG_INF).log_softmax(dim=-1)


def personalized_reward(
    reward_logits: torch.Tensor, base_logits: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Token-level personalized reward of each candidate (DESIGN step 3).

    r(a) = log_softmax_k(l_rm)[a] - log_softmax_k(l_base)[a], both normalised
    over the candidates. All arguments [M, K] (already gathered at the
    candidates); invalid columns get a reward of 0.
    """
    reward = masked_log_softmax(reward_logits, valid) - masked_log_softmax(base_logits, valid)
    return reward.masked_fill(~valid, 0.0)


def guided_scores(
    base_candidate_logits: torch.Tensor,
    valid: torch.Tensor,
    rewards: torch.Tensor,
    reward_owner: torch.Tensor,
    preference_weight: torch.Tensor,
    guidance_weight: torch.Tensor,
) -> torch.Tensor:
    """s(a) = l_base[a] + w * sum_j w_j r_j(a), -inf outside the candidates.

    base_candidate_logits, valid [N, K]; rewards [M, K]; reward_owner [M] the
    request index of each reward row; preference_weight [M]; guidance_weight [N].
    w = 0 gives exactly the base logits.
    """
    summed = torch.zeros_like(base_candidate_logits)
    if rewards.numel():
        summed.index_add_(0, reward_owner, rewards * preference_weight[:, None])
    scores = base_candidate_logits + guidance_weight[:, None] * summed
    return scores.masked_fill(~valid, NEG_INF)
