"""Incremental detokenization: text deltas that are always whole UTF-8
characters, with the tokenizer's own spacing rules.

Uses tokenizers' DecodeStream (it buffers byte-level pieces until they form
valid UTF-8) rather than a hand-rolled prefix/read offset scheme.
"""

from __future__ import annotations

import re
from functools import lru_cache

from tokenizers import Tokenizer, decoders
from tokenizers.decoders import DecodeStream


CONTEXT_TOKENS = 4  # tokens before a piece decoded with it, for the spacing rules


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Seeding with the prompt's tail gives the right leading space for
        # tokenizers whose decoding depends on the previous token.
        context = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=skip_special_tokens)
        self._ids = context  # the context, then every token fed
        self._shown = len(context)  # tokens whose text has been given out

    def step(self, token_id: int) -> str:
        text = self._stream.step(self._tokenizer, token_id) or ""
        self._ids.append(token_id)
        if text:
            self._shown = len(self._ids)
        return text

    def flush(self) -> str:
        """The text of the tokens held back, when the answer ends: what a
        decode of the whole answer shows for them (bytes that never made a
        character as U+FFFD). Without it, an answer cut by max_tokens or
        end-of-sequence after a token holding half a character (" \xf0",
        a space and an emoji's first byte) lost that token's space, and a
        run of such tokens lost the whole rest of the answer."""
        if self._shown == len(self._ids):
            return ""
        start = max(0, self._shown - CONTEXT_TOKENS)
        before = self._tokenizer.decode(self._ids[start:self._shown], skip_special_tokens=self._skip_special)
        whole = self._tokenizer.decode(self._ids[start:], skip_special_tokens=self._skip_special)
        self._shown = len(self._ids)
        return whole[len(before):] if whole.startswith(before) else whole


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The raw bytes of one token (OpenAI's logprobs `bytes`): a token holding
    part of a multi-byte character gives its real bytes, not those of U+FFFD,
    so a client can join the bytes of consecutive tokens into text."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text or token_id in tokenizer.added_tokens_decoder:
        return list(text.encode("utf-8"))
    piece = tokenizer.convert_ids_to_tokens(token_id)
    match = _BYTE_FALLBACK.fullmatch(piece)
    if match:  # SentencePiece byte fallback
        return [int(match.group(1), 16)]
    alphabet = _byte_level_alphabet()
    if isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel) and all(ch in alphabet for ch in piece):
        return [alphabet[ch] for ch in piece]
    return list(text.encode("utf-8"))
