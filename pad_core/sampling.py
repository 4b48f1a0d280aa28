"""Next-token choice as pure functions: penalties, temperature, top-p,
greedy or seeded sampling. Per-row generators make a request's samples
independent of whatever else is in the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pad_core.transfer import to_device
from pad_core.validation import TEMPERATURE_FLOOR

# The column/token of a row that has no distribution to choose from.
INVALID_TOKEN = -1
# The engine's: the model scored the row, but the request's own rules
# (allowed_token_ids, bad_words, min_tokens, a grammar) left no token.
NO_LEGAL_TOKEN = -2


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


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each distribution of probs [R, C] beyond cumulative
    mass top_p [R] (the most likely token is always kept, however small
    top_p: 5e-324 is 0.0 in float32; rows with top_p >= 1 keep everything).
    Not renormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def usable_rows(scores: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows with a finite best score and no NaN or +inf anywhere
    (-inf is an excluded column). Only such a row has a distribution."""
    return torch.isfinite(scores.max(dim=-1).values)


def sampling_probs(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """softmax(scores / T) after top-p, per row of scores [R, C]
    (temperature, top_p [R]). Scores that overflow when divided by T are
    shifted by their maximum first (softmax is shift-invariant), so no
    temperature yields inf or NaN; a row with no usable score gets a uniform
    distribution (a valid draw, which the caller discards)."""
    scores = scores.float()
    temperature = temperature.float()[:, None]
    best = scores.max(dim=-1, keepdim=True).values
    scaled = scores / temperature
    overflowed = ~torch.isfinite(scaled.max(dim=-1, keepdim=True).values)
    scaled = torch.where(overflowed, (scores - best) / temperature, scaled)
    probs = top_p_filter(torch.softmax(scaled, dim=-1), top_p)
    usable = usable_rows(scores)[:, None]
    return torch.where(usable, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index [1] drawn from the distribution probs [C], as
    torch.multinomial(probs, 1) draws it (the same exponential race, the same
    generator use), without multinomial's two checks that read the device."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=True)


def draw_rows(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One index per row of probs [R, C] -> [R], each row's draw exactly
    `draw(probs[row], generators[row])`: every row races with its own
    generator (a request's samples do not depend on what else is in the
    batch), but into one buffer, so the division and the argmax run once
    for all rows: one kernel per row (the exponentials) instead of five
    (on a GPU at 64 sampled rows, ~64 launches a step instead of ~320)."""
    race = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        race[row].exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def choose_tokens(
    scores: torch.Tensor,
    temperature: Sequence[float],
    top_p: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one column per row of scores [N, C] (-inf = excluded).

    temperature below TEMPERATURE_FLOOR (0 included): argmax, as vLLM does.
    Otherwise sample from softmax(scores / T) after top-p, with the row's own
    generator (`sampling_probs`). A row with no usable score (NaN or +inf,
    or every column excluded) gets INVALID_TOKEN: the caller ends that
    request alone. Returns column indices [N], on scores' device; reads
    nothing back from it (the settings are host lists).
    """
    chosen = scores.argmax(dim=-1)
    usable = usable_rows(scores)
    sampled = [row for row, temp in enumerate(temperature) if temp >= TEMPERATURE_FLOOR]
    if sampled:
        device = scores.device
        index = to_device(sampled, torch.long, device)
        probs = sampling_probs(
            scores[index],
            to_device([temperature[row] for row in sampled], torch.float32, device),
            to_device([top_p[row] for row in sampled], torch.float32, device),
        )
        draws = draw_rows(probs, [generators[row] for row in sampled])
        chosen = chosen.index_copy(0, index, draws)
    return torch.where(usable, chosen, INVALID_TOKEN)


def top_logprobs(log_probs: torch.Tensor, token_ids: torch.Tensor, count: int):
    """Log-probability of the chosen tokens and the `count` most likely ones.

    log_probs [N, V], token_ids [N] -> (chosen [N], top values [N, count], top ids [N, count]).
    """
    chosen = log_probs.gather(1, token_ids[:, None]).squeeze(1)
    values, ids = log_probs.topk(count, dim=-1) if count else (log_probs[:, :0], token_ids[:, None][:, :0])
    return chosen, values, ids


def token_ranks(log_probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Each chosen token's rank in its row, as vLLM reports it: 1 + how many
    tokens are strictly more likely. log_probs [N, V], chosen [N] (their
    log-probabilities) -> [N] long."""
    return (log_probs > chosen[:, None]).sum(dim=-1) + 1


def banned_by_bad_words(words: Sequence[Sequence[int]], generated: Sequence[int]) -> list[int]:
    """The tokens that would finish one of the bad `words` (token ids) next:
    a one-token word always, a longer one where the answer so far ends with
    all of it but its last token (vLLM's bad_words; like vLLM, the prompt's
    tokens do not count)."""
    banned = []
    for word in words:
        before = word[:-1]
        if not before or (len(generated) >= len(before) and list(generated[len(generated) - len(before):]) == list(before)):
            banned.append(word[-1])
    return banned


def allowed_mask(token_ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[V] bool: True at `token_ids` (those within the vocabulary), the
    tokens vLLM's allowed_token_ids leave. Made once per request
    (RequestState.allowed_mask), not at every step."""
    allowed = torch.zeros(vocab, dtype=torch.bool)
    kept = [token for token in token_ids if 0 <= token < vocab]
    allowed[torch.tensor(kept, dtype=torch.long)] = True
    return allowed.to(device)


def keep_only(logits: torch.Tensor, row: int, allowed: torch.Tensor) -> None:
    """In place: every token of `row` but the `allowed` ones ([V] bool,
    `allowed_mask`) goes to -inf."""
    logits[row].masked_fill_(~allowed, float("-inf"))


# ---- vLLM's sampling extensions and OpenAI's logit_bias --------------------
def apply_logit_bias(logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int],
                     biases: Sequence[float]) -> torch.Tensor:
    """logits [N, V] with biases[j] added at (rows[j], token_ids[j]); ids
    outside the vocabulary are ignored. Returns new logits."""
    vocab = logits.shape[1]
    kept = [j for j, token in enumerate(token_ids) if 0 <= token < vocab]
    if not kept:
        return logits
    out = logits.clone()
    index = (torch.tensor([rows[j] for j in kept], device=logits.device),
             torch.tensor([token_ids[j] for j in kept], device=logits.device))
    out.index_put_(index, torch.tensor([biases[j] for j in kept], dtype=logits.dtype, device=logits.device),
                   accumulate=True)
    return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty, as vLLM and transformers apply it: the
    logit of every token already seen (prompt or answer) is divided by the
    penalty when positive and multiplied by it when negative, so a penalty
    > 1 makes it less likely either way. logits [N, V], seen [N, V] bool,
    penalty [N] (> 0; 1: off). Returns new logits."""
    factor = penalty.to(logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / factor, logits * factor)
    return torch.where(seen, penalised, logits)


def filter_top_k_min_p(logits: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor,
                       temperature: torch.Tensor) -> torch.Tensor:
    """vLLM's top_k and min_p: tokens outside a row's top_k (0: no limit;
    ties with the k-th are kept) or below min_p times the most likely
    token's probability at the row's temperature (as vLLM, which applies
    min_p after temperature: l - l_max >= T log(min_p)) go to -inf. The
    most likely token always stays. logits [N, V]; top_k [N] long; min_p,
    temperature [N]. Returns new logits."""
    out = logits
    vocab = logits.shape[1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        values = logits.topk(int(k.max()), dim=-1).values
        kth = values.gather(1, (k - 1)[:, None])
        out = out.masked_fill(logits < kth, float("-inf"))
    if bool((min_p > 0).any()):
        best = logits.max(dim=-1, keepdim=True).values
        scale = temperature.float().clamp(min=1.0e-5)[:, None]  # greedy rows: only the argmax matters anyway
        floor = best.float() + scale * torch.log(min_p.float())[:, None]  # log 0 = -inf: no floor
        out = out.masked_fill(logits.float() < floor, float("-inf"))
    return out


def apply_sampling_controls(logits: torch.Tensor, states: Sequence) -> torch.Tensor:
    """The vLLM extensions (top_k, min_p, repetition_penalty, min_tokens,
    bad_words, allowed_token_ids) and OpenAI's logit_bias of each request,
    applied to its base row's logits [N, V], after the presence / frequency
    penalties: what plain decoding samples from, and what PAD's prescreen
    and score see. States give `request.sampling` (SamplingParams),
    `request.prompt_ids`, `request.bad_words_ids`, `generated`,
    `stop_token_ids` and `allowed_mask(vocab, device)` (allowed_token_ids as
    a [V] bool tensor). The logits themselves (no copy) when no request uses
    any of them."""
    samplings = [state.request.sampling for state in states]
    if not any(sampling.processes_logits for sampling in samplings):
        return logits
    device = logits.device
    bias_rows, bias_ids, bias_values = [], [], []
    for row, sampling in enumerate(samplings):
        for token, bias in sampling.logit_bias:
            bias_rows.append(row)
            bias_ids.append(int(token))
            bias_values.append(float(bias))
    if bias_rows:
        logits = apply_logit_bias(logits, bias_rows, bias_ids, bias_values)
    blocked = [(row, sorted(state.stop_token_ids)) for row, state in enumerate(states)
               if len(state.generated) < state.request.sampling.min_tokens and state.stop_token_ids]
    if blocked:  # min_tokens: no end of sequence yet
        logits = logits.clone()
        vocab = logits.shape[1]
        for row, stops in blocked:
            stops = [token for token in stops if 0 <= token < vocab]
            logits[row, stops] = float("-inf")
    banned = [(row, banned_by_bad_words(state.request.bad_words_ids, state.generated))
              for row, state in enumerate(states) if state.request.bad_words_ids]
    allowed = [row for row, state in enumerate(states) if state.request.sampling.allowed_token_ids]
    if any(tokens for _, tokens in banned) or allowed:
        logits = logits.clone()
        vocab = logits.shape[1]
        for row, tokens in banned:
            logits[row, [token for token in tokens if 0 <= token < vocab]] = float("-inf")
        for row in allowed:
            keep_only(logits, row, states[row].allowed_mask(vocab, logits.device))
    penalised = [row for row, sampling in enumerate(samplings) if sampling.repetition_penalty != 1.0]
    if penalised:
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        for row in penalised:
            tokens = [*states[row].request.prompt_ids, *states[row].generated]
            tokens = [token for token in tokens if 0 <= token < logits.shape[1]]
            if tokens:
                seen[row, torch.tensor(tokens, device=device)] = True
        penalty = torch.tensor([s.repetition_penalty for s in samplings], device=device)
        logits = apply_repetition_penalty(logits, seen, penalty)
    if any(sampling.top_k or sampling.min_p for sampling in samplings):
        # A grammar's mask comes first (as in vLLM): the filters then keep the
        # best *legal* tokens, and never leave a constrained row without one.
        constrained = [row for row, (state, sampling) in enumerate(zip(states, samplings, strict=True))
                       if getattr(state, "grammar", None) is not None and (sampling.top_k or sampling.min_p)]
        if constrained:
            logits = logits.clone()
            for row in constrained:
                allowed = states[row].grammar.allowed(logits.shape[1]).to(device)
                logits[row] = logits[row].masked_fill(~allowed, float("-inf"))
        logits = filter_top_k_min_p(
            logits,
            torch.tensor([s.top_k for s in samplings], dtype=torch.long, device=device),
            torch.tensor([s.min_p for s in samplings], dtype=torch.float32, device=device),
            torch.tensor([s.temperature for s in samplings], dtype=torch.float32, device=device),
        )
    return logits
