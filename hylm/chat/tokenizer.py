"""Tokenizer of a checkpoint directory and a streaming (incremental) detokenizer.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` read from `tokenizer.json`, and takes the special
tokens, BOS/EOS and chat template from `tokenizer_config.json` and the EOS ids from `generation_config.json`
(both optional). Special-token strings inside the text (`<|im_start|>`, `<think>`, ...) encode to their single
ids, as with transformers.

`IncrementalDetokenizer` turns a growing list of token ids into text pieces without ever cutting a character
in half: byte-level BPE spreads one emoji or CJK character over several tokens, so a token's text only becomes
known when the tokens after it arrive.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

_REPLACEMENT = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Text <-> token ids for one checkpoint."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None, chat_template: str | None = None):
        self._tok = tokenizer
        config = config or {}
        generation_config = generation_config or {}
        self.config = config
        self.chat_template: str | None = chat_template

        special: set[int] = set()
        for tid, added in tokenizer.get_added_tokens_decoder().items():
            if added.special:
                special.add(int(tid))
        for tid, entry in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and entry.get("special"):
                try:
                    special.add(int(tid))
                except ValueError:
                    pass
        named = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            text = _token_text(config.get(key))
            if text is not None:
                named[key] = text
                tid = tokenizer.token_to_id(text)
                if tid is not None:
                    special.add(tid)
        for text in config.get("additional_special_tokens") or []:
            text = _token_text(text)
            tid = tokenizer.token_to_id(text) if text is not None else None
            if tid is not None:
                special.add(tid)
        self.special_ids: set[int] = special

        self.bos_token: str | None = named.get("bos_token")
        self.eos_token: str | None = named.get("eos_token")
        self.pad_token: str | None = named.get("pad_token")
        bos_id = tokenizer.token_to_id(self.bos_token) if self.bos_token is not None else None
        if bos_id is None:
            ids = _as_id_list(generation_config.get("bos_token_id"))
            bos_id = ids[0] if ids else None
        self.bos_token_id: int | None = bos_id
        if self.bos_token is None and bos_id is not None:
            self.bos_token = tokenizer.id_to_token(bos_id)

        eos: list[int] = []
        if self.eos_token is not None:
            tid = tokenizer.token_to_id(self.eos_token)
            if tid is not None:
                eos.append(tid)
        for tid in _as_id_list(generation_config.get("eos_token_id")):
            if tid not in eos:
                eos.append(tid)
        self.eos_token_ids: list[int] = eos
        if self.eos_token is None and eos:
            self.eos_token = tokenizer.id_to_token(eos[0])
        self.pad_token_id: int | None = (tokenizer.token_to_id(self.pad_token)
                                         if self.pad_token is not None else None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json")
        tokenizer = _HFTokenizer.from_file(str(tok_file))
        config = _read_json(root / "tokenizer_config.json")
        generation_config = _read_json(root / "generation_config.json")
        from .template import find_checkpoint_template

        return cls(tokenizer, config, generation_config, find_checkpoint_template(root))

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike) -> Tokenizer:
        return cls(_HFTokenizer.from_file(str(tokenizer_json)))

    # ------------------------------------------------------------------ API
    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() wants a str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as e:  # e.g. a lone surrogate, which no UTF-8 tokenizer can represent
            raise ValueError(f"text cannot be tokenized: {e}") from None

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_ids}, specials={len(self.special_ids)})")


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence, a piece per `add()`.

    The concatenation of every `add()` result and `finish()` equals `tokenizer.decode(all_ids)` (for byte-level
    BPE, byte-fallback and other decoders whose output for a sequence extends their output for a prefix cut at
    a character boundary). A character whose bytes are spread over several tokens is held back until its last
    byte arrives: while the decoded text ends with U+FFFD (an incomplete UTF-8 sequence decodes to it), the
    last few U+FFFD are not emitted. `finish()` flushes what is left.

    Each step decodes only a short window. The window starts at `_prefix`, a few tokens before `_read`, so that
    decoders which treat the start of a sequence specially (leading-space stripping) see the same context a
    full decode would; `_prefix_text` caches the decoded text of `_ids[_prefix:_read]`, and `_extra` counts the
    characters after it already emitted. The new text is what the decode of `_ids[_prefix:]` has beyond those.
    Whenever the window decodes cleanly (or, while it does not, at the latest token boundary where it does)
    the read point moves forward and the tokens before the old read point are dropped, so the work per token
    stays constant however long the output grows.
    """

    # An incomplete UTF-8 character is at most 3 bytes: it decodes to one U+FFFD (byte-level BPE) or one per
    # byte (byte fallback). So at most this many trailing U+FFFD can still turn into a character.
    held_replacements = 3
    # With an incomplete tail and more than this many tokens past the read point, look for a token boundary
    # (among the last `search_depth`) where the text is complete, and move the read point there.
    search_after = 8
    search_depth = 8
    # Past this many tokens without any complete boundary (a long run of invalid bytes), the read point is
    # moved to the end anyway, so the window stays bounded; valid text never gets here.
    max_window = 256

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens whose text is already emitted
        self._read = 0  # the text of _ids[:_read] is emitted in full
        self._prefix_text = ""  # decode(_ids[_prefix:_read])
        self._extra = 0  # characters after _prefix_text already emitted
        self.num_tokens = 0  # tokens fed so far
        self.text_len = 0  # characters emitted so far

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed new token ids; returns the text they complete (possibly "")."""
        if isinstance(token_ids, int):
            new = [token_ids]
        else:
            new = [int(t) for t in token_ids]
        if not new:
            return ""
        self._ids.extend(new)
        self.num_tokens += len(new)
        return self._step(final=False)

    def finish(self) -> str:
        """Flush whatever is held back (an incomplete character comes out as U+FFFD, as in a full decode)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        text = self._decode(self._ids[self._prefix:])
        emitted = len(self._prefix_text) + self._extra  # characters of `text` already emitted
        if final or not text.endswith(_REPLACEMENT):
            out = text[emitted:]
            self.text_len += len(out)
            self._move_read(len(self._ids), len(text))
            return out
        held = len(text) - len(text.rstrip(_REPLACEMENT))
        safe = len(text) - min(held, self.held_replacements)
        out = text[emitted:safe] if safe > emitted else ""
        self._extra += len(out)
        self.text_len += len(out)
        if len(self._ids) - self._read > self.search_after:
            self._shorten(emitted + len(out))
        return out

    def _shorten(self, emitted: int) -> None:
        """The tail is incomplete and the window is getting long: move the read point to the latest token
        boundary where the decoded text is complete."""
        end = len(self._ids)
        for k in range(end - 1, max(self._read, end - 1 - self.search_depth), -1):
            head = self._decode(self._ids[self._prefix:k])
            if head and not head.endswith(_REPLACEMENT) and len(head) <= emitted:
                self._move_read(k, emitted)
                return
        if end - self._prefix > self.max_window:
            self._move_read(end, emitted)

    def _move_read(self, end: int, emitted: int) -> None:
        """Move the read point to `end` (the text up to it is emitted); `emitted` counts the characters of
        the current window's text emitted so far. The tokens after the old read point become the context."""
        if end <= self._read:
            return
        context = self._decode(self._ids[self._read:end])
        if context or end - self._prefix > self.max_window:
            drop = self._read
            self._extra = max(0, emitted - len(self._prefix_text) - len(context))
            self._prefix_text = context
        else:
            specials = getattr(self.tokenizer, "special_ids", None)
            if self.skip_special_tokens and specials and all(t in specials for t in self._ids[self._read:end]):
                # skipped special tokens: they add nothing to any decode, so forget them
                del self._ids[self._read:end]
                return
            # the new tokens decode to nothing on their own: keep the old context, which has text
            drop = self._prefix
            self._extra = max(0, emitted - len(self._prefix_text))
        self._ids = self._ids[drop:]
        self._read = end - drop
        self._prefix = 0
