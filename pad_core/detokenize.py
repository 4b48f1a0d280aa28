"""Incremental detokenization: text deltas that are always whole UTF-8
characters, with the tokenizer's own spacing rules.

Uses tokenizers' DecodeStream (it buffers byte-level pieces until they form
valid UTF-8) rather than a hand-rolled prefix/read offset scheme.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self._tokenizer = tokenizer
        # Seeding with the prompt's tail gives the right leading space for
        # tokenizers whose decoding depends on the previous token.
        self._stream = DecodeStream(ids=list(prompt_ids[-4:]) if prompt_ids else None, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""
