"""vLLM's request fields that work on token ids before decoding starts:
`bad_words` turned into token sequences (with the tokenizer), and
`truncate_prompt_tokens` applied to a request's contexts (the base prompt and
each preference's reward prompt); and where the Responses API's truncation
"auto" may cut a conversation (whole messages, the oldest first). Pure
functions but for the tokenizer call; the worker runs them in its tokenizer
thread (`prepare_chat`, `prepare_text`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pad_core.errors import ContextLengthExceededError


def bad_words_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each word as the token ids the answer would write it with: alone (at
    the answer's start, or glued to a word before it) and after a space,
    where that is a different first token of the same length (vLLM's rule:
    "hello" and " hello" are both banned; a word whose spaced form splits
    differently keeps only its bare form). Words are stripped on the left
    first, as vLLM does."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        for ids in (bare, spaced):
            if ids and ids not in sequences and (ids is bare or (len(ids) == len(bare) and ids[0] != bare[0])):
                sequences.append(ids)
    return tuple(sequences)


def truncation_length(truncate: int, context_length: int, max_tokens: int | None) -> int:
    """How many prompt tokens `truncate_prompt_tokens` keeps: the number
    asked, or with -1 as many as leave room for max_tokens (at least one
    token when max_tokens is not given). More than the context can ever
    hold is the client's error, as in vLLM."""
    room = context_length - (max_tokens if max_tokens else 1)
    if truncate == -1:
        if room < 1:
            raise ContextLengthExceededError(
                f"max_tokens {max_tokens} leaves no room for the prompt in the context length {context_length}",
                param="max_tokens")
        return room
    if truncate > context_length:
        raise ContextLengthExceededError(
            f"truncate_prompt_tokens {truncate} is more than the model's context length, {context_length}",
            param="truncate_prompt_tokens")
    return truncate


def shared_tail(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens a and b end with alike."""
    count = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        count += 1
    return count


def truncate_contexts(base: list[int], rewards: list[list[int]], keep: int,
                      side: str) -> tuple[list[int], list[list[int]]]:
    """The base prompt cut to its first ("right") or last ("left") `keep`
    tokens, and each reward prompt cut alike without losing its preference.

    A reward prompt is the base conversation with the preference written in
    near its start (a system message, or a prefix of a raw prompt): it is
    `head + tail`, where `tail` is what it shares with the end of the base
    prompt. The tokens the base loses from its conversation are taken from
    that tail; the head (with the preference) stays, else the truncation
    would silently turn PAD off. A cut into the base's own head (its chat
    template's opening, say) leaves the reward prompts whole."""
    cut = len(base) - keep
    if cut <= 0:
        return base, rewards
    if side == "right":
        return base[:keep], [reward[:max(1, len(reward) - cut)] for reward in rewards]
    truncated = []
    for reward in rewards:
        tail = shared_tail(base, reward)
        from_tail = min(tail, max(0, cut - (len(base) - tail)))  # what the base lost past its own head
        head = len(reward) - tail
        truncated.append(reward[:head] + reward[head + from_tail:])
    return base[cut:], truncated


def truncate_request(base: list[int], rewards: list[list[int]], truncate: int, context_length: int,
                     max_tokens: int | None, side: str) -> tuple[list[int], list[list[int]]]:
    """truncate_prompt_tokens applied to a request's contexts. With -1 ("as
    many as fit") every context must leave room for max_tokens, the reward
    prompts too, which keep their preference and so run longer than the
    base: the base keeps the most tokens with which the longest context
    fits (a binary search: keeping fewer never lengthens a context)."""
    room = truncation_length(truncate, context_length, max_tokens)
    kept = truncate_contexts(base, rewards, room, side)
    if truncate != -1 or longest(kept) <= room:
        return kept
    low, high = 0, room  # kept(low) fits (0: no prompt left), kept(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if longest(truncate_contexts(base, rewards, middle, side)) <= room else (low, middle)
    if low < 1:
        raise ContextLengthExceededError(
            f"a preference's reward prompt leaves no room for max_tokens {max_tokens} in the context length "
            f"{context_length}, however much of the conversation is cut", param="max_tokens")
    return truncate_contexts(base, rewards, low, side)


def longest(contexts: tuple[list[int], list[list[int]]]) -> int:
    base, rewards = contexts
    return max(len(context) for context in (base, *rewards))


def message_cut_points(messages: Sequence[dict[str, str]]) -> list[int]:
    """Where a conversation cut by truncation "auto" may start after its
    leading system messages (which stay): at a user message, so the rest
    reads as a conversation a template that wants turns to alternate can
    render; only where no user message follows the first, at the last
    message. Ascending; the first is no cut at all."""
    first = leading_system_messages(messages)
    points = [first] + [i for i in range(first + 1, len(messages)) if messages[i].get("role") == "user"]
    if len(points) == 1 and len(messages) - 1 > first:
        points.append(len(messages) - 1)
    return points


def without_oldest(messages: Sequence[dict[str, str]], point: int) -> list[dict[str, str]]:
    """The leading system messages, then the messages from `point` on."""
    first = leading_system_messages(messages)
    return [*messages[:first], *messages[max(point, first):]]


def leading_system_messages(messages: Sequence[dict[str, str]]) -> int:
    """How many messages open the conversation with the system role."""
    return next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
