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
from pad_core.transfer import select_rows, to_device


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
    Returns a new tensor (the input is left alone)."""
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

    The per-request settings are host (CPU) tensors: which rows are plain or
    guided, and the largest top_k, are read on the host, and everything is
    sent to the logits' device without a sync (pad_core.transfer). The only
    device -> host copy of a step is then the caller's read of the chosen
    tokens.
    """

    base_logits: torch.Tensor
    reward_logits_at: Callable[[torch.Tensor], torch.Tensor]
    reward_owner: torch.Tensor  # [M] long, host
    preference_weight: torch.Tensor  # [M], host
    guidance_weight: torch.Tensor  # [N], host
    top_k: torch.Tensor  # [N] long, host
    temperature: list[float]
    top_p: list[float]
    generators: list[torch.Generator | None]
    # base_logits before presence/frequency penalties (None: no penalties).
    # The reward compares the two models' own distributions; penalties act on
    # the score and the prescreen. (Penalising inside the reward would cancel
    # them out: at w = 1, l_base - log_softmax_k(l_base) is a constant.)
    unpenalised_base_logits: torch.Tensor | None = None
    # [N] in [0, 1], host: the prescreen's plausibility floor (guidance.prescreen);
    # None: top_k alone.
    min_p: torch.Tensor | None = None
    # Structured outputs: the legal tokens of the constrained rows (None: no row is).
    token_mask: TokenMask | None = None


def next_tokens(inputs: StepInputs) -> torch.Tensor:
    """Token id chosen for each request [N] (on the logits' device);
    INVALID_TOKEN for a request whose scores are not usable (NaN or
    infinite logits). Reads nothing back from the device."""
    if inputs.token_mask is not None:
        inputs = dataclasses.replace(inputs, base_logits=apply_token_mask(inputs.base_logits, inputs.token_mask))
    count = inputs.base_logits.shape[0]
    device = inputs.base_logits.device
    owners = set(inputs.reward_owner.tolist())  # host
    plain_rows = [row for row in range(count) if row not in owners]
    guided_rows = sorted(owners)
    if not plain_rows:  # every request guided (no row gather needed)
        return _guided_tokens(inputs, guided_rows)
    if not guided_rows:
        return _plain_tokens(inputs, plain_rows)
    tokens = torch.empty(count, dtype=torch.long, device=device)
    tokens[to_device(plain_rows, torch.long, device)] = _plain_tokens(inputs, plain_rows)
    tokens[to_device(guided_rows, torch.long, device)] = _guided_tokens(inputs, guided_rows)
    return tokens


def _plain_tokens(inputs: StepInputs, rows: list[int]) -> torch.Tensor:
    return choose_tokens(
        select_rows(inputs.base_logits, rows),
        [inputs.temperature[i] for i in rows],
        [inputs.top_p[i] for i in rows],
        [inputs.generators[i] for i in rows],
    )


def _guided_tokens(inputs: StepInputs, rows: list[int]) -> torch.Tensor:
    device = inputs.base_logits.device
    # Renumber owners into positions within `rows` (host).
    position = {row: index for index, row in enumerate(rows)}
    owner = to_device([position[row] for row in inputs.reward_owner.tolist()], torch.long, device)

    base = select_rows(inputs.base_logits, rows)
    top_k = inputs.top_k[rows].tolist()  # host
    min_p = None if inputs.min_p is None else to_device(inputs.min_p[rows], torch.float32, device)
    candidates, valid = prescreen(base, to_device(top_k, torch.long, device), min_p, k_max=max(top_k))  # [G, K]
    base_candidates = base.gather(1, candidates)
    unpenalised = inputs.unpenalised_base_logits
    reward_base = base_candidates if unpenalised is None else select_rows(unpenalised, rows).gather(1, candidates)
    reward_candidates = inputs.reward_logits_at(candidates[owner])  # [M, K]
    rewards = personalized_reward(reward_candidates, reward_base[owner], valid[owner])
    scores = guided_scores(
        base_candidates, valid, rewards, owner,
        to_device(inputs.preference_weight, base.dtype, device),
        to_device(inputs.guidance_weight[rows], base.dtype, device),
    )
    columns = choose_tokens(
        scores,
        [inputs.temperature[i] for i in rows],
        [inputs.top_p[i] for i in rows],
        [inputs.generators[i] for i in rows],
    )
    tokens = candidates.gather(1, columns.clamp(min=0)[:, None]).squeeze(1)
    return tokens.masked_fill(columns == INVALID_TOKEN, INVALID_TOKEN)  # no usable score: the engine fails it
