"""`hylm eval-tasks`: scoring of hand-made outputs, held-out items, needles at a target length, gold outputs
scoring 100%, and one small run through the engine."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hylm.chat import ChatTemplate, Tokenizer
from hylm.eval import tasks as ev
from hylm.train import curriculum as cur
from hylm.train.tokenizer import train_curriculum_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_curriculum_tokenizer(tmp_path_factory.mktemp("evaltok"), 400, n_examples=300)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def template(tok_dir):
    return ChatTemplate.from_dir(tok_dir)


def _example(task, seed=0, **opts):
    return cur.generate_example(task, random.Random(seed), **opts)


# ------------------------------------------------------------------------------------------ scoring
def test_arithmetic_with_thinking():
    ex = _example("arith_think", op="+")
    ok = ev.score_output(ex, f"Add them.\nColumn 1: ...\n</think>\n{ex.answer}<|im_end|>")
    assert ok.ok and ok.content == ex.answer and ok.reasoning.startswith("Add them.")
    wrong = ev.score_output(ex, f"steps\n</think>\n{int(ex.answer) + 1}<|im_end|>")
    assert not wrong.ok and "expected" in wrong.reason
    unclosed = ev.score_output(ex, f"steps {ex.answer} and more steps")
    assert not unclosed.ok and "not closed" in unclosed.reason
    extra = ev.score_output(ex, f"s\n</think>\nThe answer is {ex.answer}.")
    assert not extra.ok  # exact match on the content, nothing else


def test_arithmetic_with_thinking_off_must_have_no_reasoning():
    ex = _example("arith_direct")
    assert ex.template_kwargs["enable_thinking"] is False
    assert ev.score_output(ex, f"{ex.answer}<|im_end|>").ok
    assert ev.score_output(ex, f" {ex.answer}\n").ok  # surrounding whitespace is fine
    leaked = ev.score_output(ex, f"<think>\nlet me see\n</think>\n{ex.answer}")
    assert not leaked.ok and "reasoning present" in leaked.reason
    orphan = ev.score_output(ex, f"let me see</think>{ex.answer}")
    assert not orphan.ok and "reasoning present" in orphan.reason
    assert not ev.score_output(ex, "12").ok or ex.answer == "12"


def _call_text(name, args, close=True):
    body = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                   for k, v in args.items())
    text = f"<tool_call>\n<function={name}>\n{body}</function>\n"
    return text + ("</tool_call>" if close else "")


def _tool_example(thinking: bool):
    for seed in range(50):
        ex = _example("tool_call", seed, enable_thinking=thinking, tool="convert_currency")
        if ex.meta["tool_name"] == "convert_currency":
            return ex
    raise AssertionError("no convert_currency example")


@pytest.mark.parametrize("thinking", [False, True])
def test_tool_call_scoring(thinking):
    ex = _tool_example(thinking)
    args = ex.meta["arguments"]
    pre = "I will call the tool.\n</think>\n" if thinking else ""
    good = ev.score_output(ex, pre + _call_text("convert_currency", args) + "<|im_end|>", "first")
    assert good.ok, good.reason
    # numbers compare by value whatever their spelling
    as_float = dict(args, amount=float(args["amount"]))
    assert ev.score_output(ex, pre + _call_text("convert_currency", as_float), "first").ok
    wrong_arg = ev.score_output(ex, pre + _call_text("convert_currency", dict(args, target="XXX")), "first")
    assert not wrong_arg.ok and "wrong arguments" in wrong_arg.reason
    missing_arg = {k: v for k, v in args.items() if k != "target"}
    assert not ev.score_output(ex, pre + _call_text("convert_currency", missing_arg), "first").ok
    wrong_name = ev.score_output(ex, pre + _call_text("get_weather", args), "first")
    assert not wrong_name.ok
    declared = [t["function"]["name"] for t in ex.tools]
    other = next(n for n in ("get_weather", "get_time", "get_population", "add_numbers") if n not in declared)
    undeclared = ev.score_output(ex, pre + _call_text(other, args), "first")
    assert not undeclared.ok and "undeclared" in undeclared.reason
    unclosed = ev.score_output(ex, pre + _call_text("convert_currency", args, close=False), "first")
    assert not unclosed.ok and "malformed" in unclosed.reason
    garbage = ev.score_output(ex, pre + "<tool_call>\nconvert_currency(amount=3)\n</tool_call>", "first")
    assert not garbage.ok and "no well-formed" in garbage.reason
    two = _call_text("convert_currency", args) + "\n" + _call_text("convert_currency", args)
    assert not ev.score_output(ex, pre + two, "first").ok
    plain = ev.score_output(ex, pre + "Sure, converting now.", "first")
    assert not plain.ok
    # the answer turn, after the gold call and the tool response
    result = str(json.loads(ex.messages[-2]["content"])["result"])
    assert ev.score_output(ex, pre + f"That is {result} {args['target']}.", "last").ok
    assert not ev.score_output(ex, pre + "I do not know.", "last").ok
    assert not ev.score_output(ex, pre + _call_text("convert_currency", args), "last").ok


def test_needle_and_list_scoring():
    mv = _example("needle_multivalue", 1, num_needles=3)
    vals = mv.meta["values"]
    assert ev.score_output(mv, "They are " + ", ".join(v.upper() for v in vals) + ".").ok  # case-insensitive
    partial = ev.score_output(mv, "They are " + ", ".join(vals[:2]))
    assert not partial.ok and vals[2] in partial.reason
    s = _example("sort", 2)
    assert ev.score_output(s, s.answer + "<|im_end|>").ok
    assert not ev.score_output(s, ", ".join(reversed(s.answer.split(", "))) + "x").ok
    c = _example("count", 3)
    assert ev.score_output(c, c.answer).ok and not ev.score_output(c, c.answer + "0").ok


# ------------------------------------------------------------------------------------------ items
def test_items_use_held_out_seeds_and_generation_prompts(template, tok):
    items = ev.build_items(template, tok, rows=["arith_direct", "tool_call", "tool_call_answer"], n=3)
    assert [it.row for it in items] == ["arith_direct"] * 3 + ["tool_call"] * 3 + ["tool_call_answer"] * 3
    for it in items:
        assert it.example.seed >= cur.EVAL_SEED_BASE
        text = tok.decode(it.prompt_ids, skip_special_tokens=False)
        thinking = it.example.template_kwargs["enable_thinking"]
        assert text.endswith("<|im_start|>assistant\n<think>\n" if thinking else "<think></think>")
        assert it.max_tokens > 16
    call, answer = items[3], items[6]
    assert call.example.seed == answer.example.seed
    assert "<tool_response>" not in tok.decode(call.prompt_ids, skip_special_tokens=False)
    assert "<tool_response>" in tok.decode(answer.prompt_ids, skip_special_tokens=False)
    with pytest.raises(ValueError, match="unknown task"):
        ev.build_items(template, tok, rows=["nope"], n=1)


def test_needle_at_length_fills_the_target(template, tok):
    for target in (300, 700):
        ex = ev.needle_at_length("needle_single", cur.EVAL_SEED_BASE + 4, target, template, tok)
        n = len(cur.render_for_training(ex, template, tok)[0])
        assert n <= target
        bigger = cur.generate_example("needle_single", random.Random(ex.seed),
                                      filler_sentences=ex.meta["filler_sentences"] + 1)
        assert len(cur.render_for_training(bigger, template, tok)[0]) > target
    items = ev.build_items(template, tok, rows=["needle_single"], n=2, needle_lengths=[400])
    assert [it.row for it in items] == ["needle_single"] * 2 + ["needle_single@400"] * 2


def test_gold_outputs_score_perfectly_and_garbage_scores_zero(template, tok):
    items = ev.build_items(template, tok, n=4)

    def gold(items):
        outs = []
        for it in items:
            full, spans = cur.assistant_spans(it.example, template)
            s, e = spans[it.example.assistant_turns().index(it.turn)]
            outs.append(full[s:e])
        return outs

    report = ev.run_items(items, gold)
    assert set(report.accuracy) == set(ev.DEFAULT_ROWS)
    assert all(v == 1.0 for v in report.accuracy.values()), report.failures
    bad = ev.run_items(items, lambda its: ["</think>\nno idea<|im_end|>"] * len(its))
    assert all(v == 0.0 for v in bad.accuracy.values())
    assert all(len(f) <= 3 for f in bad.failures.values())
    answer_turn = bad.failures["tool_call_answer"][0]
    assert "{" not in answer_turn["expected"]  # the final answer text, not the tool-call JSON
    table = ev.format_table(report)
    assert "tool_call_answer" in table and "mean" in table


def test_eval_through_the_engine(tok_dir, tmp_path):
    """Plumbing: a (random) model directory with its tokenizer runs through LLM.generate and gets scored."""
    from hylm.train.configs import train_preset
    from hylm.train.tokenizer import copy_tokenizer_files
    from hylm.train.trainer import build_model
    from hylm.weights import save_hf_checkpoint

    model = build_model(train_preset("micro"), seed=0)
    save_hf_checkpoint(model, tmp_path / "m")
    copy_tokenizer_files(tok_dir, tmp_path / "m")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = ev.evaluate(tmp_path / "m", rows=["arith_direct", "tool_call"], n=2, max_tokens=6, max_num_seqs=4)
    finally:
        torch.set_num_threads(threads)
    assert report.counts == {"arith_direct": (report.counts["arith_direct"][0], 2),
                             "tool_call": (report.counts["tool_call"][0], 2)}
    assert all(0.0 <= a <= 1.0 for a in report.accuracy.values())
