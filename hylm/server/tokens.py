"""The text and bytes of single tokens, as logprobs report them.

A byte-level BPE token may hold part of a UTF-8 character, so its text alone can be lossy: the bytes are
recovered from the vocabulary string through the byte-level alphabet (each byte shown as one printable
character), and a token whose bytes are not valid UTF-8 on their own is written `bytes:\\xe2\\x80`. Added
tokens (`<|im_end|>`, `<think>`, ...) are their own text. Other vocabularies fall back to decoding the single
token.
"""

from __future__ import annotations

from typing import Any


def _byte_level_alphabet() -> dict[str, int]:
    """Printable character -> byte, for the byte-level pre-tokenizer's 256-character alphabet: printable
    Latin-1 bytes stand for themselves, the others are shifted to 256 and up, in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class TokenTexts:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend", None)
        self._added = {}
        self._byte_level = False
        if backend is not None:
            from tokenizers import decoders

            self._added = {int(i): t.content for i, t in backend.get_added_tokens_decoder().items()}
            self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._alphabet = _byte_level_alphabet() if self._byte_level else {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token."""
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if token_id in self._added:
            text = self._added[token_id]
            return text, list(text.encode("utf-8"))
        piece = self.tokenizer.id_to_token(token_id) if self._byte_level else None
        if piece is not None and all(c in self._alphabet for c in piece):
            raw = bytes(self._alphabet[c] for c in piece)
        else:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8", "surrogatepass")
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)
