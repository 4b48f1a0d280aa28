"""The next-token chooser for one step of a batch of requests: plain rows
sample from the base model, guided rows go through PAD's guidance rule.
Pure over tensors, so it is tested without a model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pad_core.guidance import NEG_INF, guided_scores, personalized_reward, prescreen
from pad_core.sampling import INVALID_TOKEN, choose_tokens


@dataclass(frozen=True)
class TokenMask:
    """Grammar constraints (structured outputs) of some of the N requests:
    rows [R] long (indices into the N), allowed [R, V] bool."""

    rows: torch.Tensor
    allowed: torch.Tensor


def apply_token_mask(logits: torch.Tensor, mask: TokenMask | None) -> torch.Tensor:
    """logits [N, V] with the tokens a row's grammar forbids at -inf; rows
    without a constraint unchanged. Applied before everything else (penalties
    are already in), so PAD's prescreen only ever sees legal candidates.
    Returns a new tensor (the input is left alone: logprobs read it)."""
    if mask is None or mask.rows.numel() == 0:
        return logits
    every_row = torch.arange(logits.shape[0], device=mask.rows.device)
    if mask.rows.shape == every_row.shape and bool((mask.rows == every_row).all()):
        return torch.where(mask.allowed, logits, NEG_INF)  # every row constrained: one pass, no copy
    masked = logits.clone()
    # torch.where, not masked_fill: grammar masks come in long runs of equal
    # bits, which where's branchy loop predicts well (~4x faster here).
    masked[mask.rows] = torch.where(mask.allowed, logits[mask.rows], NEG_INF)
    return masked


@dataclass
class StepInputs:
    """Per-request settings aligned with the rows of base_logits [N, V], and
    the M reward rows with their owner (index into the N requests).

    Reward rows are asked for their logits only at the candidates:
    reward_logits_at(candidate_ids [M, K]) -> logits [M, K].
    """

    base_logits: torch.Tensor
    reward_logits_at: Callable[[torch.Tensor], torch.Tensor]
    reward_owner: torch.Tensor  # [M] long
    preference_weight: torch.Tensor  # [M]
    guidance_weight: torch.Tensor  # [N]
    top_k: torch.Tensor  # [N] long
    temperature: list[float]
    top_p: list[float]
    generators: list[torch.Generator | None]
    # base_logits before presence/frequency penalties (None: no penalties).
    # The reward compares the two models' own distributions; penalties act on
    # the score and the prescreen. (Penalising inside the reward would cancel
    # them out: at w = 1, l_base - log_softmax_k(l_base) is a constant.)
    unpenalised_base_logits: torch.Tensor | None = None
    # [N] in [0, 1]: the prescreen's plausibility floor (guidance.prescreen);
    # None: top_k alone.
    min_p: torch.Tensor | None = None
    # Structured outputs: the legal tokens of the constrained rows (None: no row is).
    token_mask: TokenMask | None = None


def next_tokens(inputs: StepInputs) -> torch.Tensor:
    """Token id chosen for each request [N]; INVALID_TOKEN for a request
    whose scores are not usable (NaN or infinite logits)."""
    if inputs.token_mask is not None:
        inputs = dataclasses.replace(inputs, base_logits=apply_token_mask(inputs.base_logits, inputs.token_mask))
    count = inputs.base_logits.shape[0]
    device = inputs.base_logits.device
    guided = torch.zeros(count, dtype=torch.bool, device=device)
    guided[inputs.reward_owner] = True
    tokens = torch.empty(count, dtype=torch.long, device=device)

    plain_rows = (~guided).nonzero().squeeze(1).tolist()
    if plain_rows:
        tokens[plain_rows] = choose_tokens(
            inputs.base_logits[plain_rows],
            [inputs.temperature[i] for i in plain_rows],
            [inputs.top_p[i] for i in plain_rows],
            [inputs.generators[i] for i in plain_rows],
        )

    guided_rows = guided.nonzero().squeeze(1)
    if guided_rows.numel():
        tokens[guided_rows] = _guided_tokens(inputs, guided_rows)
    return tokens


def _guided_tokens(inputs: StepInputs, rows: torch.Tensor) -> torch.Tensor:
    # Renumber owners into positions within `rows`.
    position = torch.full((inputs.base_logits.shape[0],), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    owner = position[inputs.reward_owner]

    base = inputs.base_logits[rows]
    min_p = None if inputs.min_p is None else inputs.min_p[rows]
    candidates, valid = prescreen(base, inputs.top_k[rows], min_p)  # [G, K]
    base_candidates = base.gather(1, candidates)
    unpenalised = inputs.unpenalised_base_logits
    reward_base = base_candidates if unpenalised is None else unpenalised[rows].gather(1, candidates)
    reward_candidates = inputs.reward_logits_at(candidates[owner])  # [M, K]
    rewards = personalized_reward(reward_candidates, reward_base[owner], valid[owner])
    scores = guided_scores(
        base_candidates, valid, rewards, owner, inputs.preference_weight, inputs.guidance_weight[rows]
    )
    row_list = rows.tolist()
    columns = choose_tokens(
        scores,
        [inputs.temperature[i] for i in row_list],
        [inputs.top_p[i] for i in row_list],
        [inputs.generators[i] for i in row_list],
    )
    tokens = candidates.gather(1, columns.clamp(min=0)[:, None]).squeeze(1)
    return tokens.masked_fill(columns == INVALID_TOKEN, INVALID_TOKEN)  # no usable score: the engine fails it
