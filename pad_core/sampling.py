"""Next-token choice as pure functions: penalties, temperature, top-p,
greedy or seeded sampling. Per-row generators make a request's samples
independent of whatever else is in the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pad_core.validation import TEMPERATURE_FLOOR

# The column/token of a row that has no distribution to choose from.
INVALID_TOKEN = -1


def apply_penalties(
    logits: torch.Tensor,
    token_counts: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """OpenAI presence/frequency penalties.

    logits [N, V]; token_counts [N, V] (how often each token was generated);
    penalties [N]. Returns new logits.
    """
    counts = token_counts.to(logits.dtype)
    return logits - presence_penalty[:, None] * (counts > 0) - frequency_penalty[:, None] * counts


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of one distribution [C] beyond cumulative mass top_p
    (the most likely token is always kept, however small top_p: 5e-324 is
    0.0 in float32). Not renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    drop = mass_before >= top_p
    drop[0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def usable_rows(scores: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows with a finite best score and no NaN or +inf anywhere
    (-inf is an excluded column). Only such a row has a distribution."""
    return torch.isfinite(scores.max(dim=-1).values)


def choose_tokens(
    scores: torch.Tensor,
    temperature: Sequence[float],
    top_p: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one column per row of scores [N, C] (-inf = excluded).

    temperature below TEMPERATURE_FLOOR (0 included): argmax, as vLLM does.
    Otherwise sample from softmax(scores / T) after top-p, with the row's own
    generator. Scores that overflow when divided by T are shifted by their
    maximum first, so no temperature yields inf or NaN. A row with no usable score (NaN or +inf,
    or every column excluded) gets INVALID_TOKEN: the caller ends that
    request alone. Returns column indices [N].
    """
    chosen = scores.argmax(dim=-1)
    usable = usable_rows(scores)
    chosen[~usable] = INVALID_TOKEN
    for row, temp in enumerate(temperature):
        if temp < TEMPERATURE_FLOOR or not usable[row]:
            continue
        scaled = scores[row].float() / temp
        if not bool(torch.isfinite(scaled.max())):  # overflowed: shift first (softmax is shift-invariant)
            scaled = (scores[row].float() - scores[row].float().max()) / temp
        probs = torch.softmax(scaled, dim=-1)
        probs = top_p_filter(probs, top_p[row])
        chosen[row] = torch.multinomial(probs, 1, generator=generators[row]).squeeze(0)
    return chosen


def top_logprobs(log_probs: torch.Tensor, token_ids: torch.Tensor, count: int):
    """Log-probability of the chosen tokens and the `count` most likely ones.

    log_probs [N, V], token_ids [N] -> (chosen [N], top values [N, count], top ids [N, count]).
    """
    chosen = log_probs.gather(1, token_ids[:, None]).squeeze(1)
    values, ids = log_probs.topk(count, dim=-1) if count else (log_probs[:, :0], token_ids[:, None][:, :0])
    return chosen, values, ids
