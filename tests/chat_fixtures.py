"""A small byte-level BPE tokenizer checkpoint for the chat-layer tests, with Nemotron's special-token ids."""

from __future__ import annotations

import json
from pathlib import Path

from hylm.chat.template import bundled_template_source

# The real Nemotron 3 ids: <unk> 0, <s> 1, </s> 2, fillers, then the chat / reasoning / tool markers.
SPECIAL_TOKENS = (
    ["<unk>", "<s>", "</s>"]
    + [f"<SPECIAL_{i}>" for i in range(3, 10)]
    + ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
       "<tool_response>", "</tool_response>"]
)
EXPECTED_IDS = {
    "<unk>": 0, "<s>": 1, "</s>": 2, "<SPECIAL_3>": 3, "<SPECIAL_9>": 9, "<|im_start|>": 10, "<|im_end|>": 11,
    "<think>": 12, "</think>": 13, "<tool_call>": 14, "</tool_call>": 15, "<tool_response>": 16,
    "</tool_response>": 17,
}

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A hybrid model mixes state space layers with attention.
Mamba layers keep a fixed-size state, so the cost per token does not grow with the context length.
Attention layers look back over every earlier token and keep a key/value cache for each one.
The user asked about the weather in Paris, London and Tokyo; the assistant called a tool to find out.
Reasoning comes first, inside think tags, and the answer follows it. Tools are declared in the system turn.
She said: "It's sunny today, isn't it?" He replied, "Yes -- but rain is expected tomorrow (maybe)."
def add(a, b):
    return a + b
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
"""
_DIGITS = " ".join(str(n) for n in range(0, 200, 7)) + " 3.14159 2.71828 1,000,000 2024-06-01 12:30:45\n"
_OTHER = "😀 😂 👍 🎉 🚀 ❤️ 你好，世界！ 今天天气很好。 日本語のテキスト。 한국어 텍스트 café naïve Grüße – — … ±×÷ Ωπ∑\n"
CORPUS = [_ENGLISH, _DIGITS, _OTHER] * 4


def build_test_tokenizer(path: str | Path, *, vocab_size: int = 600, eos_token: str = "<|im_end|>",
                         generation_eos: list[int] | None = None, chat_template: str | None = None,
                         with_template: bool = True) -> Path:
    """Train a byte-level BPE on a small corpus and write a checkpoint-style tokenizer into `path`:
    tokenizer.json, tokenizer_config.json (bos/eos, chat_template = hylm's bundled template unless given,
    left out with with_template=False) and generation_config.json (eos_token_id [2, 11] unless given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    for text, want in EXPECTED_IDS.items():
        got = tok.token_to_id(text)
        if got != want:
            raise AssertionError(f"special token {text!r} got id {got}, want {want}")
    tok.save(str(out / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": eos_token,
        "unk_token": "<unk>",
        "model_max_length": 262144,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    if with_template:
        config["chat_template"] = chat_template if chat_template is not None else bundled_template_source()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    gen = {"bos_token_id": 1, "eos_token_id": [2, 11] if generation_eos is None else generation_eos}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return out
