"""The synthetic curriculum: determinism per seed, task content, arithmetic traces, rendering with a loss
mask on exactly the assistant-generated text, and the BPE tokenizer with Nemotron's special ids."""

from __future__ import annotations

import json
import random
import re

import pytest

from hylm.chat import ChatTemplate, Tokenizer
from hylm.train import curriculum as cur
from hylm.train.tokenizer import MARKUP_TOKENS, SPECIAL_IDS, train_curriculum_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_curriculum_tokenizer(tmp_path_factory.mktemp("curtok"), 400, n_examples=300)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def template(tok_dir):
    return ChatTemplate.from_dir(tok_dir)


# ------------------------------------------------------------------------------------------ generator
@pytest.mark.parametrize("task", cur.TASKS)
def test_generator_is_deterministic_per_seed(task):
    a = [cur.generate_example(task, random.Random(s)).to_dict() for s in range(8)]
    b = [cur.generate_example(task, random.Random(s)).to_dict() for s in range(8)]
    assert a == b
    distinct = {json.dumps(d, sort_keys=True) for d in a}
    assert len(distinct) >= 6, f"{task}: seeds give too few distinct examples"


def test_iter_examples_deterministic_and_seed_ranges():
    first = [e.to_dict() for _, e in zip(range(20), cur.iter_examples(seed=5))]
    again = [e.to_dict() for _, e in zip(range(20), cur.iter_examples(seed=5))]
    other = [e.to_dict() for _, e in zip(range(20), cur.iter_examples(seed=6))]
    assert first == again
    assert first != other
    assert first[1:] == other[:-1]  # example i of seed s is example i - 1 of seed s + 1
    assert {e["task"] for e in first} >= {"tool_call", "arith_think"}  # the default mix covers many tasks
    assert all(0 <= e["seed"] < cur.TRAIN_SEED_LIMIT for e in first)
    assert cur.example_seed(0, cur.TRAIN_SEED_LIMIT + 3) == 3  # the training range wraps
    held = next(cur.iter_examples(seed=0, held_out=True))
    assert held.seed >= cur.EVAL_SEED_BASE
    only = [e.task for _, e in zip(range(10), cur.iter_examples(0, mix={"copy": 1.0}))]
    assert set(only) == {"copy"}
    with pytest.raises(ValueError, match="unknown task"):
        cur.check_mix({"nope": 1.0})


def test_needle_options_control_haystack_and_needles():
    ex = cur.generate_example("needle_multikey", random.Random(1), filler_sentences=40, num_needles=3)
    text = ex.messages[-2]["content"]
    assert ex.meta["filler_sentences"] == 40
    assert text.count("One of the special magic") == 3
    assert ex.answer in text and ex.meta["key"] in text.split("\n\n")[-1]
    short = cur.generate_example("needle_single", random.Random(2), filler_sentences=2)
    long = cur.generate_example("needle_single", random.Random(2), context_tokens=900)
    assert len(long.messages[-2]["content"]) > 5 * len(short.messages[-2]["content"])
    mv = cur.generate_example("needle_multivalue", random.Random(3), num_needles=3)
    prompt = mv.messages[-2]["content"]
    assert len(mv.meta["values"]) == 3 and all(v in prompt for v in mv.meta["values"])
    # values are listed in the order they appear in the text
    assert [prompt.index(v) for v in mv.meta["values"]] == sorted(prompt.index(v) for v in mv.meta["values"])
    # for one seed, more filler sentences only append: the haystack of k is a prefix of that of k + 1
    a = cur.generate_example("needle_single", random.Random(9), filler_sentences=10)
    b = cur.generate_example("needle_single", random.Random(9), filler_sentences=11)
    assert a.answer == b.answer and a.meta["key"] == b.meta["key"]


def test_niah_task_asks_what_the_harness_asks_and_answers_every_value():
    """The `niah` task is a case of `hylm niah`'s prompt: same instruction, needle sentences and question; the
    answer is exactly the expected values (multivalue in the order the needles appear) and the harness's
    scorer gives it full marks."""
    from hylm.eval import niah

    seen = set()
    for s in range(60):
        ex = cur.generate_example("niah", random.Random(s))
        meta, prompt = ex.meta, ex.messages[0]["content"]
        seen.add((meta["variant"], meta["haystack"]))
        assert ex.messages[0]["role"] == "user" and ex.messages[-1]["role"] == "assistant"
        assert ex.template_kwargs == {"enable_thinking": False} and ex.messages[-1]["content"] == ex.answer
        t = niah.TYPE_NAMES[meta["value_type"]]
        assert prompt.startswith(f"Some special magic {t} are hidden in the long text below.")
        assert prompt.endswith(f"Answer with the {t[:-1] if len(meta['values']) == 1 else t} only.")
        assert ex.answer == ", ".join(meta["values"])
        assert niah.score(ex.answer, meta["values"]) == 1.0
        for v in meta["values"]:
            assert re.search(rf"One of the special magic {t} for [a-z]+-[a-z]+ is: {re.escape(v)}\.", prompt)
        if meta["variant"] == "multivalue":
            assert [prompt.index(v) for v in meta["values"]] == sorted(prompt.index(v) for v in meta["values"])
        if meta["variant"] in ("single", "multikey"):
            key = re.search(r"special magic \w+ for ([a-z]+-[a-z]+) mentioned", prompt).group(1)
            assert f"for {key} is: {meta['values'][0]}." in prompt
    assert {v for v, _ in seen} == set(niah.VARIANTS) and {h for _, h in seen} == {"noise", "essay"}
    a = cur.generate_example("niah", random.Random(1), filler_sentences=10, haystack="noise", variant="single")
    b = cur.generate_example("niah", random.Random(1), filler_sentences=30, haystack="noise", variant="single")
    assert len(b.messages[0]["content"]) > len(a.messages[0]["content"]) and a.answer == b.answer
    assert a.messages[0]["content"].count("The grass is green.") == 2  # 10 noise sentences: the 5 twice


_EXPR = re.compile(r"(-?\d+(?: [-+*] \d+)+) = (-?\d+)")

@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_arithmetic_traces_are_correct(op):
    rng = random.Random(op)
    for _ in range(150):
        ex = cur.generate_example("arith_think", rng, op=op)
        a, b = ex.meta["a"], ex.meta["b"]
        trace = ex.messages[-1]["reasoning_content"]
        assert ex.answer == str(eval(f"{a} {op} {b}"))
        assert ex.messages[-1]["content"] == ex.answer
        checked = 0
        for expr, value in _EXPR.findall(trace):
            assert eval(expr) == int(value), f"{expr} = {value} in\n{trace}"
            checked += 1
        assert checked >= 2
        for written, rev in re.findall(r"Digits written: ([\d ]+)\. Reversed: (\d+)\.", trace):
            assert "".join(reversed(written.split())) == rev
        assert trace.endswith(f"So {a} {op} {b} = {ex.answer}.")
        low = cur.generate_example("arith_low_effort", random.Random(1), op=op)
        assert len(low.messages[-1]["reasoning_content"]) < len(cur.arith_trace(low.meta["a"], op, low.meta["b"]))


def test_thinking_modes_of_tasks():
    d = cur.generate_example("arith_direct", random.Random(0))
    assert d.template_kwargs == {"enable_thinking": False} and "reasoning_content" not in d.messages[-1]
    low = cur.generate_example("arith_low_effort", random.Random(0))
    assert low.template_kwargs == {"enable_thinking": True, "low_effort": True}
    tools = [cur.generate_example("tool_call", random.Random(s)) for s in range(20)]
    assert {t.template_kwargs["enable_thinking"] for t in tools} == {True, False}
    for t in tools:
        roles = [m["role"] for m in t.messages if m["role"] != "system"]
        assert roles == ["user", "assistant", "tool", "assistant"]
        call = t.messages[-3]["tool_calls"][0]["function"]
        assert call["name"] == t.meta["tool_name"] and call["arguments"] == t.meta["arguments"]
        assert t.meta["tool_name"] in [x["function"]["name"] for x in t.tools]
        for m in t.messages:
            if m["role"] == "assistant":
                assert ("reasoning_content" in m) == t.template_kwargs["enable_thinking"]


# ------------------------------------------------------------------------------------------ rendering
def _masked_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)


@pytest.mark.parametrize("task", cur.TASKS)
def test_every_task_renders_with_answer_in_assistant_text(task, tok, template):
    for seed in range(3):
        ex = cur.generate_example(task, random.Random(seed))
        ids, mask = cur.render_for_training(ex, template, tok)
        assert len(ids) == len(mask) and any(mask) and len(ids) < 1000
        assistant = _masked_text(tok, ids, mask)
        if task == "tool_call":
            assert "<tool_call>" in assistant and f"<function={ex.meta['tool_name']}>" in assistant
            for k, v in ex.meta["arguments"].items():
                assert f"<parameter={k}>\n{v}\n</parameter>" in assistant
            assert ex.meta["final_answer"] in assistant
        elif task in cur.NEEDLE_TASKS:
            assert all(v in assistant for v in ex.meta["values"])
        else:
            assert ex.answer in assistant
        assert assistant.endswith("<|im_end|>")


@pytest.mark.parametrize("task", cur.TASKS)
def test_loss_mask_covers_exactly_the_assistant_parts(task, tok, template):
    for seed in range(3):
        ex = cur.generate_example(task, random.Random(100 + seed))
        full, spans = cur.assistant_spans(ex, template)
        ids, mask = cur.render_for_training(ex, template, tok)
        # the pieces add up to the whole conversation, and the masked tokens to exactly the spans
        assert tok.decode(ids, skip_special_tokens=False) == full
        assert _masked_text(tok, ids, mask) == "".join(full[s:e] for s, e in spans)
        # and the unmasked ones to everything else
        rest, pos = [], 0
        for s, e in spans:
            rest.append(full[pos:s])
            pos = e
        rest.append(full[pos:])
        assert tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False) == "".join(rest)
        assert len(spans) == len(ex.assistant_turns())
        for (s, e), i in zip(spans, ex.assistant_turns()):
            prompt = cur.render_prompt(ex, template, i)
            assert full[:s] == prompt  # the span starts right after the generation prompt
            gen = full[s:e]
            assert gen.endswith("<|im_end|>") and gen.count("<|im_end|>") == 1
            assert "<|im_start|>" not in gen
            if ex.template_kwargs.get("enable_thinking", True):
                assert prompt.endswith("<|im_start|>assistant\n<think>\n")
                assert "\n</think>\n" in gen and "<think>" not in gen
            else:
                assert prompt.endswith("<|im_start|>assistant\n<think></think>")
                assert "think>" not in gen
        if ex.template_kwargs.get("low_effort"):
            assert "{reasoning effort: low}" in full


def test_masked_token_boundaries_match_whole_text_tokenization(tok, template):
    """Piecewise tokenization equals tokenizing the whole conversation at once (clean boundaries)."""
    for seed in range(30):
        ex = cur.example_for_seed(seed)
        full, _ = cur.assistant_spans(ex, template)
        ids, _ = cur.render_for_training(ex, template, tok)
        assert ids == tok.encode(full), ex.task


def test_inconsistent_thinking_mode_is_refused(template, tok):
    ex = cur.generate_example("arith_direct", random.Random(0))
    ex.template_kwargs = {"enable_thinking": True}  # no reasoning, but a thinking prompt
    with pytest.raises(ValueError, match="generation prompt"):
        cur.render_for_training(ex, template, tok)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_special_ids_digits_and_files(tok_dir, tok):
    for text, want in SPECIAL_IDS.items():
        assert tok.token_to_id(text) == want
        assert tok.encode(text) == [want]
    assert SPECIAL_IDS["<|im_start|>"] == 10 and SPECIAL_IDS["</think>"] == 13
    # digits are always single tokens
    ids = tok.encode("x 12345 + 678 = 13023")
    pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert all(len(p.strip()) == 1 for p in pieces if any(c.isdigit() for c in p))
    # markup survives skip_special_tokens (the reasoning / tool parsers read it); chat markers do not
    text = "<think>\nr\n</think>\n<tool_call>\n<function=f>\n</function>\n</tool_call><|im_end|>"
    out = tok.decode(tok.encode(text), skip_special_tokens=True)
    assert all(m in out for m in ("<think>", "</think>", "<tool_call>", "</tool_call>"))
    assert "<|im_end|>" not in out
    assert set(MARKUP_TOKENS) <= set(SPECIAL_IDS)
    gen = json.loads((tok_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 11] and gen["bos_token_id"] == 1 and gen["pad_token_id"] == 0
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in cfg["chat_template"]
    assert tok.bos_token_id == 1 and 11 in tok.eos_token_ids and 2 in tok.eos_token_ids
    assert tok.vocab_size <= 400
    # the BPE learned no merges across special tokens
    assert all("<|" not in t for t in tok.backend.get_vocab() if t not in SPECIAL_IDS)
