"""Tokenizer of a checkpoint directory and a streaming (incremental) detokenizer.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` read from `tokenizer.json`, and takes the special
tokens, BOS/EOS and chat template from `tokenizer_config.json` and the EOS ids from `generation_config.json`
(both optional). Special-token strings inside the text (`<|im_start|>`, `<think>`, ...) encode to their single
ids, as with transformers.

`IncrementalDetokenizer` (from `hylm.detokenize`, re-exported here) turns a growing list of token ids into text
pieces without ever cutting a character in half.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from ..detokenize import IncrementalDetokenizer  # noqa: F401  (re-exported)


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
