"""Tokenizers in GGUF metadata: a checkpoint's byte-level BPE `tokenizer.json` -> `tokenizer.ggml.*` (as
llama.cpp's converter writes a "gpt2" vocabulary), and back to a hylm Tokenizer.

Written keys: `tokenizer.ggml.model` "gpt2", `tokenizer.ggml.pre` (the pre-tokenizer llama.cpp should
apply, recognised from tokenizer.json's pre_tokenizer), `tokenizer.ggml.tokens` (one string per model
vocabulary row; ids the tokenizer does not use become "[PAD<id>]", type UNUSED, as the converter pads),
`tokenizer.ggml.token_type` (NORMAL; CONTROL for special added tokens; USER_DEFINED for other added
tokens), `tokenizer.ggml.merges`, and through `gguf.SpecialVocab` the special token ids, add_bos/add_eos and
`tokenizer.chat_template` (from tokenizer_config.json or chat_template.jinja).
A model without tokenizer.json gets `tokenizer.ggml.model` "none" (llama.cpp then runs on token ids).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf

TokenType = gguf.TokenType
K = gguf.Keys.Tokenizer

# tokenizer.json pre_tokenizer (as a canonical structure) -> llama.cpp's pre-tokenizer name
_BYTE_LEVEL = ("ByteLevel", True)
_KNOWN_PRE = {
    (_BYTE_LEVEL,): "gpt-2",  # the GPT-2 split regex
    (("Digits", True), _BYTE_LEVEL): "refact",  # each digit alone, then the GPT-2 regex
}
_PRE_TOKENIZERS = {"gpt-2": (_BYTE_LEVEL,), "refact": (("Digits", True), _BYTE_LEVEL)}


class TokenizerExportError(ValueError):
    """A tokenizer that cannot be written as a llama.cpp BPE vocabulary."""


def _pre_structure(pre: dict[str, Any] | None) -> tuple | None:
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        if step.get("type") == "ByteLevel":
            out.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif step.get("type") == "Digits":
            out.append(("Digits", bool(step.get("individual_digits", False))))
        else:
            return None
    return tuple(out)


def detect_pre(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json's pre-tokenizer; None when unrecognised."""
    return _KNOWN_PRE.get(_pre_structure(tokenizer_json.get("pre_tokenizer")))


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def vocabulary(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerExportError(f"only BPE tokenizers can be exported, this one is {model.get('type')!r}")
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types: dict[int, int] = {i: TokenType.NORMAL for i in by_id}
    for added in tokenizer_json.get("added_tokens") or []:
        i, text = int(added["id"]), added["content"]
        by_id[i] = text
        types[i] = TokenType.CONTROL if added.get("special") or _looks_special(text) else TokenType.USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise TokenizerExportError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [int(types.get(i, TokenType.UNUSED)) for i in range(vocab_size)]
    return tokens, token_types


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: str | os.PathLike | None, vocab_size: int,
                  config: Any = None, pre: str | None = None) -> dict[str, Any]:
    """Write the tokenizer metadata of `model_dir` (its tokenizer.json and tokenizer_config.json) to
    `writer`. `pre` overrides the detected pre-tokenizer name. Returns a summary: model, pre, tokens,
    merges, warnings."""
    warnings: list[str] = []
    path = Path(model_dir) / "tokenizer.json" if model_dir is not None else None
    if path is None or not path.is_file():
        writer.add_tokenizer_model("none")
        if config is not None:  # llama.cpp still reads the special ids
            for key, value in (("bos", config.bos_token_id), ("pad", config.pad_token_id)):
                if isinstance(value, int):
                    getattr(writer, f"add_{key}_token_id")(value)
            ends = config.eos_token_ids()
            if ends:
                writer.add_eos_token_id(ends[0])
        return {"model": "none", "pre": None, "tokens": 0, "merges": 0, "warnings": warnings}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerExportError(f"{path}: not valid JSON ({e})") from None
    tokens, types = vocabulary(data, vocab_size)
    if pre is None:
        pre = detect_pre(data)
        if pre is None:
            pre = "default"
            warnings.append(f"{path}: pre-tokenizer not recognised; wrote tokenizer.ggml.pre = 'default' "
                            "(llama.cpp may split text differently from the original tokenizer)")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(path.parent, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None:  # hylm's own lookup also knows templates gguf's does not
        from ..chat.template import find_checkpoint_template
        special.chat_template = find_checkpoint_template(path.parent)
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "warnings": warnings}


# ---- reading back -----------------------------------------------------------------------------------------

def tokenizer_from_gguf(file: Any):
    """The hylm Tokenizer (hylm.chat.Tokenizer) of a GGUF file's `gpt2` vocabulary whose pre-tokenizer hylm
    knows ("gpt-2", "refact"); None when the file carries none or another kind. `file` is a GGUFFile or
    a path."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from ..chat.tokenizer import Tokenizer as HylmTokenizer
    from .gguf_loader import GGUFFile

    file = file if hasattr(file, "reader") else GGUFFile(file)
    if file.get(K.MODEL, None) != "gpt2" or file.get(K.PRE, "gpt-2") not in _PRE_TOKENIZERS:
        return None
    tokens = file.get(K.LIST)
    types = file.get(K.TOKEN_TYPE, [TokenType.NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in file.get(K.MERGES, [])]
    # every used token sits in the BPE vocabulary at its id (added tokens too, as in tokenizer.json), so that
    # registering the added tokens below reuses those ids
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != TokenType.UNUSED}
    if len(vocab) != sum(1 for t in types if t != TokenType.UNUSED):
        return None  # the same string at two ids: not representable as a BPE vocabulary
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    steps = []
    for kind, flag in _PRE_TOKENIZERS[file.get(K.PRE, "gpt-2")]:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=flag) if kind == "ByteLevel"
                     else pre_tokenizers.Digits(individual_digits=flag))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    added = [(i, t) for i, t in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    tok.add_tokens([AddedToken(t, special=types[i] == TokenType.CONTROL, normalized=False) for i, t in added])

    def token(key: str) -> str | None:
        i = file.get(key, None)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {k: v for k, v in (("bos_token", token(K.BOS_ID)), ("eos_token", token(K.EOS_ID)),
                                ("unk_token", token(K.UNK_ID)), ("pad_token", token(K.PAD_ID))) if v is not None}
    ends = [int(i) for i in (file.get(K.EOS_ID, None), file.get(K.EOT_ID, None)) if i is not None]
    return HylmTokenizer(tok, config, {"eos_token_id": list(dict.fromkeys(ends))},
                         file.get(K.CHAT_TEMPLATE, None))


__all__ = ["add_tokenizer", "detect_pre", "vocabulary", "tokenizer_from_gguf", "TokenizerExportError"]
