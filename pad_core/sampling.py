"""Next-token choice as pure functions: penalties, temperature, top-p,
greedy or seeded sampling. Per-row generators make a request's samples
independent of whatever else is in the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    (the most likely token is always kept). Not renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def choose_tokens(
    scores: torch.Tensor,
    temperature: Sequence[float],
    top_p: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one column per row of scores [N, C] (-inf = excluded).

    temperature 0: argmax. Otherwise sample from softmax(scores / T) after
    top-p, with the row's own generator. Returns column indices [N].
    """
    chosen = scores.argmax(dim=-1)
    for row, temp in enumerate(temperature):
        if temp <= 0:
            continue
        probs = torch.softmax(scores[row].float() / temp, dim=-1)
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
