"""Accuracy per curriculum task on held-out seeds (`hylm eval-tasks MODEL`).

For each task, `n` examples are generated from held-out seeds `seed_base + i` (`seed_base` defaults to
10**9; training uses seeds < 10**6). Each example's prompt is its conversation up to the assistant turn
under test, rendered with `add_generation_prompt=True` and the example's template kwargs (thinking on /
off, low effort). The model (hylm engine) decodes greedily until `<|im_end|>` / `</s>`; the output is
decoded with special tokens kept, split into reasoning and content (`hylm.chat.reasoning.parse_reasoning`)
and scored (`score_output`):

* thinking off (`arith_direct`, needles, copy / reverse / count / sort, half the tool examples): any
  reasoning (an opening `<think>` or a `</think>`) fails the example.
* thinking on: the reasoning must be closed by `</think>`; only the content after it is scored.
* needles: every expected value appears in the content (case-insensitive, RULER's rule).
* arithmetic and the list tasks: the content, stripped, equals the answer exactly.
* `tool_call` (the turn that calls): exactly one well-formed `<tool_call>` block (as many `<tool_call>`,
  `</tool_call>` and `</function>` as parsed calls), naming the right function with the right arguments
  (values converted by the tool schema, numbers compared by value).
  `tool_call_answer` (the turn after the gold call and its `<tool_response>`): no tool call, and the
  content contains the facts of the tool result.

`retrieval_at_lengths`: the needle tasks again at multiples of the training length (`train_len` tokens, read
from the model directory's train_summary.json when present, else 512), each haystack grown sentence by
sentence with the model's own tokenizer until prompt + answer fill the target length. Rows are named
`needle_single@2048`, ...
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..train import curriculum
from ..train.curriculum import EVAL_SEED_BASE, NEEDLE_TASKS, TASKS, Example

EOS_MARKERS = ("<|im_end|>", "</s>")

# row name -> (curriculum task, which assistant turn: "first" or "last")
EVAL_ROWS: dict[str, tuple[str, str]] = {t: (t, "last") for t in TASKS if t != "tool_call"}
EVAL_ROWS["tool_call"] = ("tool_call", "first")
EVAL_ROWS["tool_call_answer"] = ("tool_call", "last")
DEFAULT_ROWS: tuple[str, ...] = tuple(
    [r for t in TASKS for r in ((t,) if t != "tool_call" else ("tool_call", "tool_call_answer"))])


@dataclass
class Score:
    ok: bool
    reason: str = ""
    reasoning: str | None = None
    content: str | None = None


@dataclass
class EvalItem:
    row: str
    example: Example
    turn: int  # index of the assistant message under test
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class EvalReport:
    accuracy: dict[str, float] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # row -> (correct, total)
    failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # a few per row

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "counts": {k: list(v) for k, v in self.counts.items()},
                "failures": self.failures}


# ---------------------------------------------------------------------------------------------- scoring
def cut_at_eos(text: str) -> str:
    ends = [i for i in (text.find(m) for m in EOS_MARKERS) if i >= 0]
    return text[: min(ends)] if ends else text


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def arguments_match(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Same argument names, values equal (numbers by value, strings stripped)."""
    return _same(got, want)


def _turn_kind(example: Example, turn: int | str | None) -> str:
    turns = example.assistant_turns()
    if turn in (None, "last"):
        turn = turns[-1]
    elif turn == "first":
        turn = turns[0]
    if example.task == "tool_call":
        return "tool_call" if turn == turns[0] else "tool_call_answer"
    return example.task


def score_output(example: Example, text: str, turn: int | str | None = None) -> Score:
    """Score the model's raw output `text` (decoded with special tokens, as generated after the prompt)
    for `example` at assistant message `turn` (an index, "first" or "last"; default last)."""
    from ..chat.reasoning import THINK_CLOSE, THINK_OPEN, parse_reasoning

    text = cut_at_eos(text)
    thinking = example.template_kwargs.get("enable_thinking", True)
    thinking = True if thinking is None else bool(thinking)
    reasoning, content = parse_reasoning(text, prompt_in_thinking=thinking)
    if not thinking:
        if reasoning is not None or THINK_OPEN in text or THINK_CLOSE in text:
            return Score(False, "reasoning present with thinking off", reasoning, content)
    elif THINK_CLOSE not in text:
        return Score(False, "reasoning not closed by </think>", reasoning, content)
    content = content or ""
    kind = _turn_kind(example, turn)
    meta = example.meta

    if kind == "tool_call":
        from ..chat.tool_calls import parse_tool_calls

        _, calls = parse_tool_calls(content, example.tools, id_factory=lambda: "call_eval")
        if not calls:
            _, any_calls = parse_tool_calls(content, None, id_factory=lambda: "call_eval")
            if any_calls:  # well-formed, but the parser only accepts declared functions
                return Score(False, f"called undeclared function {any_calls[0].name!r}", reasoning, content)
            return Score(False, "no well-formed tool call", reasoning, content)
        n = len(calls)
        if any(content.count(tag) != n for tag in ("<tool_call>", "</tool_call>", "</function>")):
            return Score(False, "malformed tool call block", reasoning, content)
        if n != 1:
            return Score(False, f"expected 1 tool call, got {n}", reasoning, content)
        call = calls[0]
        if call.name != meta["tool_name"]:
            return Score(False, f"called {call.name!r}, expected {meta['tool_name']!r}", reasoning, content)
        if not arguments_match(call.arguments, meta["arguments"]):
            return Score(False, f"wrong arguments {call.arguments_json}", reasoning, content)
        return Score(True, "", reasoning, content)
    if kind == "tool_call_answer":
        if "<tool_call>" in content:
            return Score(False, "called a tool instead of answering", reasoning, content)
        missing = [s for s in meta["final_contains"] if s.lower() not in content.lower()]
        if missing:
            return Score(False, f"answer lacks {missing}", reasoning, content)
        return Score(True, "", reasoning, content)
    if kind in NEEDLE_TASKS:
        missing = [v for v in meta["values"] if v.lower() not in content.lower()]
        if missing:
            return Score(False, f"missing {missing}", reasoning, content)
        return Score(True, "", reasoning, content)
    if content.strip() != example.answer:
        return Score(False, f"expected {example.answer!r}", reasoning, content)
    return Score(True, "", reasoning, content)


def expected_text(example: Example, turn: int | str | None = None) -> str:
    """What a correct output contains, for reports."""
    if _turn_kind(example, turn) == "tool_call_answer":
        return example.meta["final_answer"]
    return example.answer


# ---------------------------------------------------------------------------------------------- items
def _turn_index(example: Example, which: str) -> int:
    turns = example.assistant_turns()
    return turns[0] if which == "first" else turns[-1]


def _gold_tokens(example: Example, template: Any, tokenizer: Any, turn: int) -> int:
    _, spans = curriculum.assistant_spans(example, template)
    idx = example.assistant_turns().index(turn)
    full = template.render(example.messages, tools=example.tools, add_generation_prompt=False,
                           **example.template_kwargs)
    s, e = spans[idx]
    return len(tokenizer.encode(full[s:e]))


def make_item(row: str, example: Example, which: str, template: Any, tokenizer: Any,
              max_tokens: int | None = None) -> EvalItem:
    turn = _turn_index(example, which)
    prompt = curriculum.render_prompt(example, template, turn)
    gold = _gold_tokens(example, template, tokenizer, turn)
    budget = 2 * gold + 16 if max_tokens is None else max_tokens
    return EvalItem(row, example, turn, tokenizer.encode(prompt), budget)


def needle_at_length(task: str, seed: int, target_tokens: int, template: Any, tokenizer: Any,
                     **opts: Any) -> Example:
    """The needle example of `seed` whose rendered conversation (prompt + answer) is the longest that fits
    in `target_tokens`: the haystack grows one filler sentence at a time (binary search; for a fixed seed
    the haystack of k sentences is a prefix of that of k + 1, so the length grows with k)."""
    def build(k: int) -> tuple[Example, int]:
        ex = curriculum.generate_example(task, random.Random(seed), filler_sentences=k, **opts)
        ex.seed = seed
        ids, _ = curriculum.render_for_training(ex, template, tokenizer)
        return ex, len(ids)

    lo_ex, lo_len = build(0)
    if lo_len > target_tokens:
        return lo_ex
    lo, hi = 0, max(1, target_tokens // curriculum.TOKENS_PER_FILLER_SENTENCE)
    while build(hi)[1] <= target_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if build(mid)[1] <= target_tokens:
            lo = mid
        else:
            hi = mid
    return build(lo)[0]


def build_items(template: Any, tokenizer: Any, rows: Iterable[str] | None = None, n: int = 50,
                seed_base: int = EVAL_SEED_BASE, needle_lengths: Iterable[int] = (),
                task_opts: dict[str, dict[str, Any]] | None = None, max_tokens: int | None = None
                ) -> list[EvalItem]:
    rows = list(DEFAULT_ROWS if rows is None else rows)
    unknown = [r for r in rows if r not in EVAL_ROWS]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)} (tasks: {', '.join(DEFAULT_ROWS)})")
    task_opts = task_opts or {}
    items = []
    for row in rows:
        task, which = EVAL_ROWS[row]
        for i in range(n):
            ex = curriculum.generate_example(task, random.Random(seed_base + i), **task_opts.get(task, {}))
            ex.seed = seed_base + i
            items.append(make_item(row, ex, which, template, tokenizer, max_tokens))
    for length in needle_lengths:
        for task in NEEDLE_TASKS:
            if task not in rows:
                continue
            for i in range(n):
                ex = needle_at_length(task, seed_base + i, int(length), template, tokenizer)
                items.append(make_item(f"{task}@{int(length)}", ex, "last", template, tokenizer, max_tokens))
    return items


# ---------------------------------------------------------------------------------------------- running
def run_items(items: list[EvalItem], generate: Callable[[list[EvalItem]], list[str]],
              keep_failures: int = 3) -> EvalReport:
    """Score `generate(items) -> raw output texts` per row."""
    outputs = generate(items)
    report = EvalReport()
    totals: dict[str, list[int]] = {}
    for item, text in zip(items, outputs):
        s = score_output(item.example, text, item.turn)
        t = totals.setdefault(item.row, [0, 0])
        t[0] += int(s.ok)
        t[1] += 1
        if not s.ok and len(report.failures.setdefault(item.row, [])) < keep_failures:
            report.failures[item.row].append({"seed": item.example.seed, "reason": s.reason, "output": text,
                                              "expected": expected_text(item.example, item.turn)})
    for row, (ok, total) in totals.items():
        report.counts[row] = (ok, total)
        report.accuracy[row] = ok / total if total else 0.0
    return report


def engine_generate(llm: Any, tokenizer: Any, batch_size: int = 64) -> Callable[[list[EvalItem]], list[str]]:
    """A `generate` for `run_items` on the hylm engine: greedy, stops at the tokenizer's EOS ids."""
    from ..engine.sampling_params import SamplingParams

    # the tokenizer's EOS ids (tokenizer_config eos + generation_config eos_token_id); hylm's own layout else
    stop_ids = sorted(set(getattr(tokenizer, "eos_token_ids", None) or [2, 11]))

    def generate(items: list[EvalItem]) -> list[str]:
        texts: list[str] = []
        for lo in range(0, len(items), batch_size):
            chunk = items[lo: lo + batch_size]
            params = [SamplingParams(temperature=0.0, max_tokens=it.max_tokens, stop_token_ids=stop_ids,
                                     skip_special_tokens=False) for it in chunk]
            outs = llm.generate([it.prompt_ids for it in chunk], params)
            for out in outs:
                texts.append(tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=False))
        return texts

    return generate


def train_length(model_dir: str | os.PathLike, default: int = 512) -> int:
    path = Path(model_dir) / "train_summary.json"
    if path.is_file():
        try:
            return int(json.loads(path.read_text())["seq_len"])
        except (KeyError, ValueError, TypeError, json.JSONDecodeError):
            pass
    return default


def evaluate(model_dir: str | os.PathLike, rows: Iterable[str] | None = None, n: int = 50,
             seed_base: int = EVAL_SEED_BASE, retrieval_at_lengths: Iterable[float] = (),
             train_len: int | None = None,
             max_tokens: int | None = None, max_num_seqs: int = 8, dtype: str = "fp32", device: str = "cpu",
             task_opts: dict[str, dict[str, Any]] | None = None) -> EvalReport:
    """Load the model directory (weights + tokenizer + chat template), run every row, score.
    `retrieval_at_lengths`: multiples of the training length (`train_len`) at which the needle tasks run
    again (rows `needle_single@L`, ...)."""
    from ..chat import ChatTemplate, Tokenizer
    from ..engine.llm import LLM

    tokenizer = Tokenizer.from_dir(model_dir)
    template = ChatTemplate.from_dir(model_dir)
    tl = train_len or train_length(model_dir)
    lengths = [int(round(m * tl)) for m in retrieval_at_lengths]
    items = build_items(template, tokenizer, rows, n, seed_base, lengths, task_opts, max_tokens)
    longest = max((len(it.prompt_ids) + it.max_tokens for it in items), default=64)
    llm = LLM(str(model_dir), tokenizer=tokenizer, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
              max_model_len=longest + 8)
    return run_items(items, engine_generate(llm, tokenizer))


def format_table(report: EvalReport) -> str:
    rows = list(report.accuracy)
    width = max([len(r) for r in rows] + [len("task")])
    lines = [f"{'task':<{width}}  accuracy  correct/total", f"{'-' * width}  --------  -------------"]
    for r in rows:
        ok, total = report.counts[r]
        lines.append(f"{r:<{width}}  {report.accuracy[r]:8.3f}  {ok}/{total}")
    if rows:
        mean = sum(report.accuracy.values()) / len(rows)
        lines.append(f"{'mean':<{width}}  {mean:8.3f}")
    return "\n".join(lines)
