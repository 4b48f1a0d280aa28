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


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self._tokenizer = tokenizer
        # Seeding with the prompt's tail gives the right leading space for
        # tokenizers whose decoding depends on the previous token.
        self._stream = DecodeStream(ids=list(prompt_ids[-4:]) if prompt_ids else None, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""


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
