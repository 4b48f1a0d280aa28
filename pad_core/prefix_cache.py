"""Prefix caching: the KV of finished rows, reused by new rows whose prompts
begin with the same tokens (vLLM's automatic prefix caching, llama.cpp's
prompt cache).

A chat's next turn re-sends the whole conversation: its prompt is the last
turn's prompt, the answer, and the new message. Without a cache each turn
prefills every token again (~0.7 s for 1.7k tokens on 2 CPU cores, and
with PAD every reward row too); with one, only the new tokens.

When a row leaves, the runner hands its KV here with the tokens it holds
(`store`); a new row asks for the longest cached prefix of its prompt
(`longest`) and prefills only the rest. Prefixes are matched in blocks of
`block` tokens through a chain of block hashes (block i's hash covers blocks
0..i), so a prompt that shares only the first part of a cached sequence
still reuses that part; a hit is checked token by token, so a hash
collision costs a miss, never a wrong answer. Entries are per adapter (a
LoRA reward row's KV differs from the base row's) and evicted least
recently used first, within a byte budget; an entry that a newer one
contains (a chat's earlier turn) leaves when that one is stored.

Shapes: an entry's KV is [layers, 2, kv_heads, length, head_dim] (2: keys,
values), one contiguous tensor per entry.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_BLOCK = 32  # tokens per hashed block: the granularity of a hit


@dataclass
class Entry:
    adapter: Hashable
    tokens: tuple[int, ...]  # a whole number of blocks
    kv: torch.Tensor  # [layers, 2, kv_heads, len(tokens), head_dim]
    hashes: tuple[int, ...]  # the chain hash of each block

    @property
    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def block_hashes(token_ids: Sequence[int], block: int) -> Iterator[int]:
    """The chain hash of each whole block of `token_ids`: block i's covers
    every token up to the end of block i."""
    previous = 0
    for start in range(0, len(token_ids) - block + 1, block):
        previous = hash((previous, tuple(token_ids[start : start + block])))
        yield previous


class PrefixCache:
    """KV of token sequences, by adapter, within `budget_bytes`."""

    def __init__(self, budget_bytes: int, block: int = DEFAULT_BLOCK):
        if block < 1:
            raise ValueError("block must be at least 1 token")
        self.budget_bytes = budget_bytes
        self.block = block
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self._index: dict[tuple[Hashable, int], int] = {}  # (adapter, chain hash) -> entry id
        self._next_id = 0
        self.bytes = 0
        # Counters (tokens): what new rows asked for, and what they found.
        self.queried_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, adapter: Hashable, prompt_ids: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """The longest cached prefix of `prompt_ids` that leaves at least one
        token to prefill (the row's first hidden state comes from it):
        (its length, its KV [layers, 2, kv_heads, length, head_dim], a view
        to copy from), or (0, None)."""
        self.queried_tokens += len(prompt_ids)
        found = self._find(adapter, prompt_ids)
        if found is None:
            return 0, None
        entry_id, entry, length = found
        self._entries.move_to_end(entry_id)
        self.hit_tokens += length
        return length, entry.kv[:, :, :, :length]

    def peek(self, adapter: Hashable, prompt_ids: Sequence[int]) -> int:
        """The length `longest` would find now, without counting or touching
        anything (a scheduler sizing a prompt's first piece)."""
        found = self._find(adapter, prompt_ids)
        return 0 if found is None else found[2]

    def _find(self, adapter: Hashable, prompt_ids: Sequence[int]) -> tuple[int, Entry, int] | None:
        """(entry id, entry, length) of the longest cached prefix that leaves
        a token of `prompt_ids` to prefill, checked token by token."""
        usable = prompt_ids[: max(len(prompt_ids) - 1, 0)]
        found: tuple[int, Entry, int] | None = None
        for blocks, chain in enumerate(block_hashes(usable, self.block), start=1):
            entry_id = self._index.get((adapter, chain))
            if entry_id is None:
                break
            found = (entry_id, self._entries[entry_id], blocks * self.block)
        if found is None or tuple(prompt_ids[: found[2]]) != found[1].tokens[: found[2]]:
            return None  # none, or a hash collision: no hit
        return found

    def kept_length(self, adapter: Hashable, token_ids: Sequence[int], bytes_per_token: int) -> int:
        """How many of `token_ids` `store` would keep (its whole blocks), 0
        if none: the sequence is held already (alone or inside a longer
        one), or it is larger than the whole budget. Asked before the KV is
        copied out of the batch, so nothing is copied to be thrown away; the
        least recently used entries leave to make room for what will be kept."""
        length = len(token_ids) // self.block * self.block
        if length == 0:
            return 0
        tokens = tuple(token_ids[:length])
        return length if self._admit(adapter, tokens, tuple(block_hashes(tokens, self.block)), bytes_per_token) else 0

    def store(self, adapter: Hashable, token_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Keeps the KV of `token_ids` ([layers, 2, kv_heads, len(token_ids),
        head_dim]; its whole blocks, as `kept_length` says: the cache owns
        `kv` from here, copied only when longer than that). Entries this one
        contains (an earlier turn of the same chat, which every lookup now
        finds in this one) leave."""
        length = len(token_ids) // self.block * self.block
        if length == 0:
            return
        tokens = tuple(token_ids[:length])
        hashes = tuple(block_hashes(tokens, self.block))
        if not self._admit(adapter, tokens, hashes, kv[:, :, :, :1].numel() * kv.element_size()):
            return
        contained = {entry_id for chain in hashes if (entry_id := self._index.get((adapter, chain))) is not None
                     and len(self._entries[entry_id].tokens) <= length
                     and self._entries[entry_id].tokens == tokens[: len(self._entries[entry_id].tokens)]}
        for entry_id in contained:
            self._evict(entry_id)
        kept = kv if kv.shape[3] == length else kv[:, :, :, :length].clone()
        entry = Entry(adapter, tokens, kept, hashes)
        while self._entries and self.bytes + entry.bytes > self.budget_bytes:
            self._evict(next(iter(self._entries)))
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = entry
        self.bytes += entry.bytes
        for chain in hashes:  # a newer entry answers for a shared prefix: it is the one more likely kept
            self._index[(adapter, chain)] = entry_id

    def _admit(self, adapter: Hashable, tokens: tuple[int, ...], hashes: tuple[int, ...],
               bytes_per_token: int) -> bool:
        """Whether whole-block `tokens` (their chain `hashes`) are worth
        keeping (not held already, within the budget); makes room for them
        (least recently used first) if so."""
        if len(tokens) * bytes_per_token > self.budget_bytes:
            return False
        known = self._index.get((adapter, hashes[-1]))
        if known is not None and self._entries[known].tokens[: len(tokens)] == tokens:
            self._entries.move_to_end(known)
            return False
        while self._entries and self.bytes + len(tokens) * bytes_per_token > self.budget_bytes:
            self._evict(next(iter(self._entries)))
        return True

    def forget(self, belongs: Callable[[Hashable], bool]) -> int:
        """Drops the entries whose adapter key `belongs` (an adapter being
        unloaded: a later one of the same name has other weights, so its
        KV would be wrong); returns how many left."""
        gone = [entry_id for entry_id, entry in self._entries.items() if belongs(entry.adapter)]
        for entry_id in gone:
            self._evict(entry_id)
        return len(gone)

    def clear(self) -> None:
        """Forgets every entry (the counters stay)."""
        self._entries.clear()
        self._index.clear()
        self.bytes = 0

    def _evict(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.bytes -= entry.bytes
        orphaned = [chain for chain in entry.hashes if self._index.get((entry.adapter, chain)) == entry_id]
        for chain in orphaned:
            del self._index[(entry.adapter, chain)]
        if not orphaned:
            return
        # Another entry may hold the same blocks (two conversations from one
        # system prompt): the most recently used one answers for them now.
        wanted = set(orphaned)
        for other_id in reversed(self._entries):
            other = self._entries[other_id]
            if other.adapter != entry.adapter:
                continue
            for chain in wanted.intersection(other.hashes):
                self._index[(entry.adapter, chain)] = other_id
            wanted.difference_update(other.hashes)
            if not wanted:
                return
