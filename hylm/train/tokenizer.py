"""Train a byte-level BPE tokenizer (HF `tokenizers`) with Nemotron 3's special-token ids.

Special tokens sit at fixed ids, those of the real Nemotron 3 tokenizer where known (see REFERENCE.md 3):
`<unk>` 0, `<s>` 1, `</s>` 2, `<SPECIAL_3>`..`<SPECIAL_9>` 3-9, `<|im_start|>` 10, `<|im_end|>` 11, `<think>` 12,
`</think>` 13, `<tool_call>` 14, `</tool_call>` 15, `<tool_response>` 16, `</tool_response>` 17.

Pre-tokenization: digits are split one per token (`Digits(individual_digits=True)`) before the usual byte-level
split, so numbers tokenize digit by digit and column arithmetic is learnable. No normalizer, no BOS added
(the chat template writes every marker itself).

Written files (what `hylm.chat.Tokenizer.from_dir` and `ChatTemplate.from_dir` read):
* tokenizer.json
* tokenizer_config.json -- bos `<s>`, eos `<|im_end|>`, unk / pad `<unk>`, `added_tokens_decoder`, and
  `chat_template` = hylm's bundled Nemotron 3 template when it is available.
* generation_config.json -- bos 1, eos [2, 11], pad 0.

The markup tokens `<think>`, `</think>`, `<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>` are
added tokens that are NOT flagged special, so a decode with `skip_special_tokens=True` keeps them and the
reasoning / tool-call parsers see them (they still always encode to their single ids). `<unk>`, `<s>`, `</s>`,
`<SPECIAL_n>`, `<|im_start|>` and `<|im_end|>` are special.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

SPECIAL_TOKENS: tuple[str, ...] = (
    ("<unk>", "<s>", "</s>")
    + tuple(f"<SPECIAL_{i}>" for i in range(3, 10))
    + ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
       "</tool_response>")
)
SPECIAL_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
# added tokens that are text markup the chat parsers read: not skipped by decode(skip_special_tokens=True)
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
BOS, EOS, UNK, PAD = "<s>", "<|im_end|>", "<unk>", "<unk>"
GENERATION_EOS_IDS = [2, 11]

_SPLIT = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    """The training text with every special token cut out: BPE must not learn merges like '<|' or '?<|'
    (the trainer sees raw text; added tokens are only split off when encoding)."""
    for text in texts:
        for piece in _SPLIT.split(text):
            if piece:
                yield piece


def build_tokenizer_object(vocab_size: int, texts: Iterable[str], min_frequency: int = 2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(texts), trainer=trainer)
    # re-flag the markup tokens as non-special (same ids, same content)
    data = json.loads(tok.to_str())
    for entry in data.get("added_tokens", []):
        if entry["content"] in MARKUP_TOKENS:
            entry["special"] = False
    tok = Tokenizer.from_str(json.dumps(data))
    for text, want in SPECIAL_IDS.items():
        got = tok.token_to_id(text)
        if got != want:
            raise RuntimeError(f"tokenizer training put {text!r} at id {got}, expected {want}")
        if tok.encode(text).ids != [want]:
            raise RuntimeError(f"{text!r} does not encode to the single id {want}")
    return tok


def tokenizer_config(chat_template: str | None) -> dict:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": t not in MARKUP_TOKENS, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def _bundled_template() -> str | None:
    try:
        from ..chat.template import bundled_template_source

        return bundled_template_source()
    except (ImportError, OSError, FileNotFoundError):
        try:  # the template file without the chat module
            return (Path(__file__).resolve().parent.parent / "chat" / "templates" / "nemotron3.jinja").read_text(
                encoding="utf-8")
        except OSError:
            return None


def write_tokenizer_files(tok, out_dir: str | os.PathLike, chat_template: str | None = "bundled") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = _bundled_template() if chat_template == "bundled" else chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(template), indent=2, ensure_ascii=False)
                                               + "\n", encoding="utf-8")
    gen = {"bos_token_id": SPECIAL_IDS[BOS], "eos_token_id": list(GENERATION_EOS_IDS), "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, min_frequency: int = 2,
                    chat_template: str | None = "bundled") -> Path:
    """Train the BPE on `texts` and write tokenizer.json, tokenizer_config.json and generation_config.json
    into `out_dir`. `vocab_size` counts every token (specials, the 256 byte symbols, merges); a corpus too
    small to support that many merges gives fewer. `chat_template`: "bundled" (hylm's Nemotron 3 template
    if present), a template string, or None. Returns out_dir."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + byte alphabet)")
    tok = build_tokenizer_object(vocab_size, texts, min_frequency)
    return write_tokenizer_files(tok, out_dir, chat_template)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer / template files of a checkpoint directory (those that exist)."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)


def train_curriculum_tokenizer(out_dir: str | os.PathLike, vocab_size: int, n_examples: int = 5000, seed: int = 0,
                               mix: dict[str, float] | None = None, task_opts: dict | None = None) -> Path:
    """A tokenizer trained on `n_examples` rendered curriculum conversations (training seeds from `seed`)."""
    from .curriculum import corpus_texts

    return train_tokenizer(corpus_texts(n_examples, seed=seed, mix=mix, task_opts=task_opts), vocab_size, out_dir)
