"""Needle-in-a-haystack evaluation (`hylm niah`): gkamradt-style length x depth grids with RULER NIAH variants.

One *case* is (length, depth, variant, sample). Building it (`build_prompt`):

1. Needles. Seeded by (seed, variant, value type, sample) only, so the same sample hides the same needles in
   every cell of the grid. A needle is the sentence "One of the special magic {type} for {key} is: {value}."
   with an adjective-noun key and a value that is a 7-digit number, an adjective-noun word or a UUID.
   Variants (RULER): ``single`` (one needle, ask it); ``multikey`` (``num_needles`` needles with distinct
   keys, ask the first: the others are distractors); ``multivalue`` (``num_needles`` values for one key, ask
   for all); ``multiquery`` (``num_needles`` keys, ask for all of them).
2. Placement (gkamradt). The first needle goes at the requested depth d, every other needle at a seeded
   random depth. Depth d means the character offset p = d/100 x (haystack characters, needles left out);
   the needle is then moved back to the previous sentence end: it is inserted before the haystack sentence
   that contains offset p (after the last sentence boundary b <= p). Depth 0 puts it at the very start,
   depth 100 after the last sentence. Several needles at one boundary keep their order.
3. Sizing. The prompt is one user message: an instruction, the haystack with the needles, and the question.
   The number n of haystack sentences is the largest for which ``count(messages) + answer_tokens <=
   length`` with the given token counter (the served model's tokenizer and chat template), found by a
   bracketing search (interpolation steps alternating with bisection) over n. So the prompt plus the room
   for the answer fits the target length, short of it by less than about one sentence.

Scoring (`score`): the fraction of the expected strings found, case-insensitively, in the answer's content
(the text after the reasoning; thinking is either disabled or its reasoning is scored out).

`run_grid` runs a grid against a backend (`InProcessBackend` or `HTTPBackend`: both have
``count_tokens(messages_or_text)`` and ``answer(messages) -> (content, reasoning)``), writes every finished case
to a JSON file keyed by ``"{length}/{depth}/{variant}/{sample}"`` so that a rerun resumes where it stopped, and
summarizes mean scores per length x depth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import urllib.error
import urllib.parse
import urllib.request
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .haystack import (HAYSTACKS, VALUE_TYPES, FileHaystack, Haystack, distinct, make_haystack, make_key,
                       make_value)

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
FORMAT = "hylm-niah/1"
TYPE_NAMES = {"numbers": "numbers", "words": "words", "uuids": "UUIDs"}
THINK_CLOSE = "</think>"

Messages = list[dict]
CountFn = Callable[[Messages], int]


# ---- cases ------------------------------------------------------------------------------------------------

@dataclass
class Needle:
    key: str
    value: str
    text: str
    depth: float  # requested, percent of the haystack's characters
    offset: int = 0  # where the needle sentence starts in the context text
    haystack_offset: int = 0  # the sentence boundary it was moved back to, in haystack characters
    actual_depth: float = 0.0  # haystack_offset as a percent of the haystack's characters


@dataclass
class Case:
    messages: Messages
    expected: list[str]
    length: int
    depth: float
    variant: str
    sample: int
    prompt_tokens: int  # count(messages): the prompt with the template, without the answer room
    sentences: int  # haystack sentences (needles not counted)
    needles: list[Needle]
    question: str
    context: str = field(repr=False, default="")

    @property
    def prompt_messages(self) -> Messages:
        return self.messages


def needle_sentence(key: str, value: str, value_type: str) -> str:
    return f"One of the special magic {TYPE_NAMES[value_type]} for {key} is: {value}."


def make_needles(variant: str, value_type: str, seed: int, sample: int, depth: float,
                 num_needles: int = 4) -> tuple[list[Needle], list[str], str]:
    """-> (needles, expected answers, question). The first needle sits at `depth`, the rest at seeded depths."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value type must be one of {', '.join(VALUE_TYPES)}, got {value_type!r}")
    k = 1 if variant == "single" else num_needles
    if k < 1 or (variant != "single" and k < 2):
        raise ValueError(f"{variant} needs at least 2 needles, got {num_needles}")
    rng = random.Random(f"hylm-niah:{seed}:{variant}:{value_type}:{sample}")
    if variant == "multivalue":
        keys = [make_key(rng)] * k
    else:
        keys = distinct(rng, make_key, k)
    values = distinct(rng, lambda r: make_value(r, value_type), k, avoid=set(keys))
    depths = [float(depth)] + [round(rng.uniform(0.0, 100.0), 1) for _ in range(k - 1)]
    needles = [Needle(kk, v, needle_sentence(kk, v, value_type), d) for kk, v, d in zip(keys, values, depths)]
    t = TYPE_NAMES[value_type]
    if variant in ("single", "multikey"):
        expected = [values[0]]
        question = f"What is the special magic {t[:-1]} for {keys[0]} mentioned in the text above?"
    elif variant == "multivalue":
        expected = list(values)
        question = f"What are all the special magic {t} for {keys[0]} mentioned in the text above?"
    else:
        expected = list(values)
        ks = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        question = f"What are the special magic {t} for {ks} mentioned in the text above?"
    question += f" Answer with the {t[:-1] if len(expected) == 1 else t} only."
    return needles, expected, question


def place_needles(units: Sequence[str], needles: Sequence[Needle]) -> str:
    """Insert the needles into the haystack sentences (see the module doc) and return the text. Sets each
    needle's `offset` (in the returned text), `haystack_offset` and `actual_depth`."""
    bounds = [0]
    for u in units:
        bounds.append(bounds[-1] + len(u))
    total = bounds[-1]
    at: dict[int, list[Needle]] = {}
    for nd in needles:
        p = nd.depth / 100.0 * total
        i = max(0, bisect_right(bounds, p) - 1)  # the last boundary <= p (the sentence containing p starts there)
        at.setdefault(i, []).append(nd)
        nd.haystack_offset = bounds[i]
        nd.actual_depth = round(100.0 * bounds[i] / total, 3) if total else 0.0
    parts: list[str] = []
    pos = 0
    for i in range(len(units) + 1):
        for nd in at.get(i, ()):
            if parts and not parts[-1][-1:].isspace():
                parts.append(" ")
                pos += 1
            nd.offset = pos
            parts.append(nd.text + " ")
            pos += len(nd.text) + 1
        if i < len(units):
            parts.append(units[i])
            pos += len(units[i])
    return "".join(parts)


def render_messages(context: str, question: str, value_type: str) -> Messages:
    t = TYPE_NAMES[value_type]
    intro = (f"Some special magic {t} are hidden in the long text below. Read it carefully and remember them: "
             f"you will be asked about them afterwards.")
    return [{"role": "user", "content": f"{intro}\n\n{context}\n\n{question}"}]


def _search(count_at: Callable[[int], int], budget: int, first_guess: int) -> tuple[int, int]:
    """The largest n with count_at(n) <= budget (count_at(0) must fit) -> (n, count_at(n)).
    Assumes counts grow with n; the answer is always one that was counted and fits."""
    c0 = count_at(0)
    lo, clo = 0, c0
    hi = chi = None
    n = max(1, first_guess)
    while hi is None:  # grow until a count does not fit
        c = count_at(n)
        if c > budget:
            hi, chi = n, c
            break
        lo, clo = n, c
        per = max((c - c0) / n, 1e-6)
        step = int((budget - c) / per * 1.1) + 1
        n = lo + max(1, min(step, budget - c + 1, 8 * lo + 64))
    interp = True
    while hi - lo > 1:
        if interp:
            m = lo + int((budget - clo) * (hi - lo) / (chi - clo))
        else:
            m = (lo + hi) // 2
        m = min(max(m, lo + 1), hi - 1)
        interp = not interp
        c = count_at(m)
        if c <= budget:
            lo, clo = m, c
        else:
            hi, chi = m, c
    return lo, clo


def build_prompt(length_tokens: int, depth: float, variant: str, seed: int, tokenizer_count_fn: CountFn, *,
                 sample: int = 0, value_type: str = "numbers", haystack: str | Haystack = "noise",
                 num_needles: int = 4, answer_tokens: int = 32) -> Case:
    """One case, sized so that ``tokenizer_count_fn(messages) + answer_tokens <= length_tokens`` with as many
    haystack sentences as fit (see the module doc for placement and sizing)."""
    if not 0.0 <= depth <= 100.0:
        raise ValueError(f"depth must be within 0..100 (percent), got {depth}")
    if answer_tokens < 0:
        raise ValueError("answer_tokens must be >= 0")
    hay = make_haystack(haystack, f"{seed}:{sample}")
    needles, expected, question = make_needles(variant, value_type, seed, sample, depth, num_needles)
    budget = length_tokens - answer_tokens
    counts: dict[int, int] = {}

    def messages_at(n: int) -> tuple[Messages, str]:
        context = place_needles(hay.units(n), needles).rstrip()
        return render_messages(context, question, value_type), context

    def count_at(n: int) -> int:
        if n not in counts:
            counts[n] = int(tokenizer_count_fn(messages_at(n)[0]))
        return counts[n]

    c0 = count_at(0)
    if c0 > budget:
        raise ValueError(f"length {length_tokens}: the prompt without haystack already takes {c0} tokens "
                         f"(+ {answer_tokens} for the answer)")
    sample_units = hay.units(32)
    chars = sum(map(len, sample_units)) / max(1, len(sample_units))
    guess = int((budget - c0) * 4.0 / max(chars, 1.0))  # ~4 characters a token: a first probe only
    n, tokens = _search(count_at, budget, guess)
    messages, context = messages_at(n)
    return Case(messages, expected, length_tokens, float(depth), variant, sample, tokens, n, needles, question,
                context)


# ---- scoring ------------------------------------------------------------------------------------------------

def score(answer: str | None, expected: Sequence[str]) -> float:
    """Fraction of the expected strings found in the answer, case-insensitively."""
    if not expected:
        raise ValueError("nothing expected")
    text = (answer or "").lower()
    return sum(1 for e in expected if e.lower() in text) / len(expected)


def split_reasoning(content: str | None, reasoning: str | None = None) -> tuple[str, str]:
    """(content, reasoning) with any reasoning left in the content (a server that does not split it: text up
    to the last </think>) moved out, so that only the answer after the reasoning is scored."""
    content, reasoning = content or "", reasoning or ""
    if THINK_CLOSE in content:
        before, _, content = content.rpartition(THINK_CLOSE)
        before = before.replace("<think>", "").strip()
        reasoning = f"{reasoning}\n{before}".strip() if reasoning else before
    return content, reasoning


# ---- backends --------------------------------------------------------------------------------------------------

def _template_kwargs(thinking: bool, reasoning_budget: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"enable_thinking": bool(thinking)}
    if thinking and reasoning_budget is not None:
        kw["reasoning_budget"] = int(reasoning_budget)
    return kw


class InProcessBackend:
    """hylm's engine in this process: the model directory's tokenizer and chat template, greedy decoding."""

    def __init__(self, model_dir: str | os.PathLike, *, thinking: bool = False, max_tokens: int = 32,
                 reasoning_budget: int | None = None, max_model_len: int | None = None, dtype: str = "fp32",
                 answer_tokens: int | None = None):
        from ..chat.chat_format import ChatFormat

        if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            raise ValueError(f"{model_dir}: no tokenizer.json (niah needs the model's tokenizer)")
        self.model_dir = str(model_dir)
        self.fmt = ChatFormat.from_dir(model_dir)
        self.thinking, self.max_tokens, self.reasoning_budget = thinking, max_tokens, reasoning_budget
        self.answer_tokens = max_tokens if answer_tokens is None else answer_tokens
        self.max_model_len, self.dtype = max_model_len, dtype
        self.template_kwargs = _template_kwargs(thinking, reasoning_budget)
        self.model_id = os.path.basename(os.path.abspath(self.model_dir))
        self._llm = None

    @property
    def settings(self) -> dict:
        return {"thinking": self.thinking, "max_tokens": self.max_tokens, "reasoning_budget": self.reasoning_budget}

    def count_tokens(self, x: str | Messages) -> int:
        if isinstance(x, str):
            return len(self.fmt.tokenizer.encode(x))
        return len(self.fmt.prompt(x, **self.template_kwargs).ids)

    def answer(self, messages: Messages) -> tuple[str, str]:
        from ..engine.llm import LLM
        from ..engine.sampling_params import SamplingParams

        if self._llm is None:
            self._llm = LLM(self.model_dir, tokenizer=self.fmt.tokenizer, dtype=self.dtype, max_num_seqs=1,
                            max_model_len=self.max_model_len)
        prompt = self.fmt.prompt(messages, **self.template_kwargs)
        rule = self.fmt.thinking_budget(prompt, self.reasoning_budget) if self.thinking else None
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens, thinking_budget=rule)
        out = self._llm.generate([prompt.ids], params)[0].outputs[0]
        res = self.fmt.parse(prompt, out.token_ids)
        return split_reasoning(res.content, res.reasoning)


class HTTPBackend:
    """An OpenAI-compatible server (hylm serve, vLLM, ...): /v1/chat/completions at temperature 0, and
    /tokenize (messages rendered by the server's template) for sizing with the served tokenizer."""

    def __init__(self, url: str, api_key: str | None = None, model_name: str | None = None, *,
                 thinking: bool = False, max_tokens: int = 32, reasoning_budget: int | None = None,
                 timeout: float = 600.0, answer_tokens: int | None = None):
        parsed = urllib.parse.urlparse(url or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"--url: expected http://HOST:PORT or https://..., got {url!r}")
        base = url.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.url, self.api_key, self.timeout = base, api_key, timeout
        self.thinking, self.max_tokens, self.reasoning_budget = thinking, max_tokens, reasoning_budget
        self.answer_tokens = max_tokens if answer_tokens is None else answer_tokens
        self.template_kwargs = _template_kwargs(thinking, reasoning_budget)
        models = self._request("GET", "/v1/models")
        ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
        if model_name is None:
            if not ids:
                raise ValueError(f"{self.url}: the server lists no model; pass --served-model-name")
            model_name = ids[0]
        elif ids and model_name not in ids:
            raise ValueError(f"{self.url} does not serve {model_name!r} (it serves: {', '.join(map(str, ids))})")
        self.model_name = self.model_id = model_name

    @property
    def settings(self) -> dict:
        return {"thinking": self.thinking, "max_tokens": self.max_tokens, "reasoning_budget": self.reasoning_budget}

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                err = json.loads(detail)
                detail = (err.get("error") or {}).get("message") or err.get("detail") or detail
            except (ValueError, AttributeError):
                pass
            raise ValueError(f"{self.url}{path}: HTTP {e.code}: {str(detail)[:300]}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"cannot reach {self.url}: {e.reason}") from None
        except (OSError, TimeoutError) as e:
            raise ValueError(f"cannot reach {self.url}: {e}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ValueError(f"{self.url}{path}: the answer is not JSON") from None

    def count_tokens(self, x: str | Messages) -> int:
        body: dict[str, Any] = {"model": self.model_name}
        if isinstance(x, str):
            body["prompt"] = x
        else:
            body.update(messages=x, add_generation_prompt=True, chat_template_kwargs=self.template_kwargs)
        out = self._request("POST", "/tokenize", body)
        if "count" in out:
            return int(out["count"])
        return len(out["tokens"])

    def answer(self, messages: Messages) -> tuple[str, str]:
        body = {"model": self.model_name, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens,
                "chat_template_kwargs": self.template_kwargs, "stream": False}
        out = self._request("POST", "/v1/chat/completions", body)
        try:
            msg = out["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{self.url}/v1/chat/completions: unexpected answer {str(out)[:200]}") from None
        return split_reasoning(msg.get("content"), msg.get("reasoning_content") or msg.get("reasoning"))


# ---- grid runner -------------------------------------------------------------------------------------------

def case_key(length: int, depth: float, variant: str, sample: int) -> str:
    return f"{length}/{depth:g}/{variant}/{sample}"


def grid_keys(lengths: Sequence[int], depths: Sequence[float], variants: Sequence[str],
              samples: int) -> list[tuple[int, float, str, int]]:
    return [(L, float(d), v, s) for v in variants for L in lengths for d in depths for s in range(samples)]


def _load(path: str | None, settings: dict) -> dict:
    doc = {"format": FORMAT, "settings": settings, "results": {}}
    if not path or not os.path.exists(path):
        return doc
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not a niah results file ({e})") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT or not isinstance(old.get("results"), dict):
        raise ValueError(f"{path}: not a {FORMAT} results file")
    before = old.get("settings", {})
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{path} holds results made with other settings ({diffs}): pass another --out or "
                         f"remove it")
    doc["results"] = old["results"]
    return doc


def _save(path: str | None, doc: dict) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _ordered(doc: dict, keys: list[str]) -> dict:
    res = doc["results"]
    out = {k: res[k] for k in keys if k in res}
    out.update((k, v) for k, v in res.items() if k not in out)
    return out


def run_grid(backend: Any, lengths: Sequence[int], depths: Sequence[float], variants: Sequence[str] = ("single",),
             samples_per_cell: int = 1, seed: int = 0, cache_path: str | None = None, *,
             value_type: str = "numbers", haystack: str | Haystack = "noise", num_needles: int = 4,
             answer_tokens: int | None = None, progress: bool = True) -> dict:
    """Run every (length, depth, variant, sample) case not already in `cache_path`, saving after each one.
    Returns the results document: {"format", "settings", "results": {key: record}, "summary"}."""
    if samples_per_cell < 1:
        raise ValueError("samples per cell must be >= 1")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {v!r}")
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value type must be one of {', '.join(VALUE_TYPES)}, got {value_type!r}")
    if answer_tokens is None:
        answer_tokens = int(getattr(backend, "answer_tokens", 32))
    hay_desc = haystack.describe() if isinstance(haystack, Haystack) else str(haystack)
    if not isinstance(haystack, Haystack) and haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)} or a file, got {haystack!r}")
    settings = {"seed": seed, "value_type": value_type, "haystack": hay_desc, "num_needles": num_needles,
                "answer_tokens": answer_tokens, "model": getattr(backend, "model_id", None),
                "generation": getattr(backend, "settings", None)}
    doc = _load(cache_path, settings)
    grid = grid_keys(lengths, depths, variants, samples_per_cell)
    keys = [case_key(*g) for g in grid]
    todo = [(k, g) for k, g in zip(keys, grid) if k not in doc["results"]]
    haystacks: dict[int, Haystack] = {}

    def hay_for(sample: int) -> Haystack:
        if isinstance(haystack, Haystack):
            return haystack
        if sample not in haystacks:
            haystacks[sample] = make_haystack(haystack, f"{seed}:{sample}")
        return haystacks[sample]

    from tqdm import tqdm

    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), disable=not progress, desc="niah", unit="case",
               dynamic_ncols=True)
    try:
        for key, (L, d, v, s) in todo:
            case = build_prompt(L, d, v, seed, backend.count_tokens, sample=s, value_type=value_type,
                                haystack=hay_for(s), num_needles=num_needles, answer_tokens=answer_tokens)
            content, reasoning = backend.answer(case.messages)
            doc["results"][key] = {
                "length": L, "depth": d, "variant": v, "sample": s, "prompt_tokens": case.prompt_tokens,
                "sentences": case.sentences, "needle_depths": [n.actual_depth for n in case.needles],
                "expected": case.expected, "answer": content, "reasoning": reasoning,
                "score": score(content, case.expected)}
            doc["results"] = _ordered(doc, keys)
            _save(cache_path, doc)
            bar.update(1)
    finally:
        bar.close()
    doc["results"] = _ordered(doc, keys)
    doc["summary"] = summarize(doc["results"], lengths, depths, variants, samples_per_cell)
    _save(cache_path, doc)
    return doc


# ---- summary -------------------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(results: dict, lengths: Sequence[int], depths: Sequence[float], variants: Sequence[str],
              samples: int) -> dict:
    """Mean scores over the grid's cases: per length x depth (over variants and samples), per length, per
    depth, per variant, and overall."""
    recs = [results[case_key(*g)] for g in grid_keys(lengths, depths, variants, samples)
            if case_key(*g) in results]
    cells = [[_mean([r["score"] for r in recs if r["length"] == L and r["depth"] == float(d)]) for d in depths]
             for L in lengths]
    return {
        "lengths": list(lengths), "depths": [float(d) for d in depths], "variants": list(variants),
        "samples": samples, "cases": len(recs),
        "scores": cells,  # scores[i][j]: length i, depth j
        "by_length": [_mean([r["score"] for r in recs if r["length"] == L]) for L in lengths],
        "by_depth": [_mean([r["score"] for r in recs if r["depth"] == float(d)]) for d in depths],
        "by_variant": {v: _mean([r["score"] for r in recs if r["variant"] == v]) for v in variants},
        "overall": _mean([r["score"] for r in recs]),
    }


def length_label(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def format_table(summary: dict) -> str:
    """Mean score (percent) per depth (rows) x length (columns), with a mean row and column."""
    def cell(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    lengths, depths = summary["lengths"], summary["depths"]
    head = ["depth \\ length"] + [length_label(L) for L in lengths] + ["mean"]
    rows = [[f"{d:g}%"] + [cell(summary["scores"][i][j]) for i in range(len(lengths))]
            + [cell(summary["by_depth"][j])] for j, d in enumerate(depths)]
    rows.append(["mean"] + [cell(x) for x in summary["by_length"]] + [cell(summary["overall"])])
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    lines = ["  ".join(x.ljust(widths[0]) if c == 0 else x.rjust(widths[c]) for c, x in enumerate(r))
             for r in [head] + rows]
    if len(summary["variants"]) > 1:
        lines.append("by variant: " + ", ".join(f"{v} {cell(s)}" for v, s in summary["by_variant"].items()))
    return "\n".join(lines)


# ---- grid axes ------------------------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """"1k,2k,4096" -> [1024, 2048, 4096] (k = 1024, m = 1024 * 1024)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        mult = 1
        if part[-1] in "kK":
            mult, part = 1024, part[:-1]
        elif part[-1] in "mM":
            mult, part = 1024 * 1024, part[:-1]
        try:
            value = float(part) * mult
        except ValueError:
            raise ValueError(f"--lengths: expected numbers like 1k,2k,4096, got {text!r}") from None
        if value < 1 or value != int(value):
            raise ValueError(f"--lengths: {part}{'' if mult == 1 else 'k' if mult == 1024 else 'm'} is not a "
                             f"whole number of tokens >= 1")
        out.append(int(value))
    if not out:
        raise ValueError("--lengths: no length given")
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    try:
        out = [float(t.rstrip("%")) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--depths: expected percentages like 0,25,50,75,100, got {text!r}") from None
    if not out or any(not 0 <= d <= 100 for d in out):
        raise ValueError(f"--depths: percentages must lie within 0..100, got {text!r}")
    return sorted(set(out))


def depth_grid(count: int, spacing: str = "linear") -> list[float]:
    """`count` depths from 0 to 100: evenly spaced, or (sigmoid) denser near both ends:
    100 * (1 + tanh(2 (2t - 1)) / tanh(2)) / 2 for t evenly spaced in [0, 1]."""
    if count < 1:
        raise ValueError("--depth-count must be >= 1")
    if count == 1:
        return [50.0]
    ts = [i / (count - 1) for i in range(count)]
    if spacing == "linear":
        ds = [100.0 * t for t in ts]
    elif spacing == "sigmoid":
        ds = [100.0 * (1 + math.tanh(2 * (2 * t - 1)) / math.tanh(2)) / 2 for t in ts]
    else:
        raise ValueError(f"--spacing must be linear or sigmoid, got {spacing!r}")
    return [round(d, 1) for d in ds]


# ---- command line ---------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="run the model in this process (a model directory)")
    src.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (hylm serve, vLLM)")
    p.add_argument("--api-key", help="bearer token for --url")
    p.add_argument("--served-model-name", help="model name at --url (default: the first the server lists)")
    p.add_argument("--lengths", default="1k,2k,4k", help="context lengths in tokens, k = 1024 (default 1k,2k,4k)")
    p.add_argument("--depths", help="needle depths in percent, e.g. 0,25,50,75,100")
    p.add_argument("--depth-count", type=int, help="this many depths from 0 to 100 (default 5)")
    p.add_argument("--spacing", choices=("linear", "sigmoid"), default="linear",
                   help="spacing of --depth-count depths (sigmoid: denser near 0 and 100)")
    p.add_argument("--variant", default="single",
                   help=f"one or more (comma-separated) of {', '.join(VARIANTS)} (default single)")
    p.add_argument("--value-type", choices=VALUE_TYPES, default="numbers", help="needle values (default numbers)")
    p.add_argument("--needles", type=int, default=4, help="needles of the multi* variants (default 4)")
    p.add_argument("--haystack", choices=HAYSTACKS, default=None, help="filler text (default essay)")
    p.add_argument("--haystack-file", metavar="F", help="filler from this text file (or directory of .txt files)")
    p.add_argument("--samples", type=int, default=3, help="cases per length x depth x variant (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="niah-results.json",
                   help="results JSON, also the cache a rerun resumes from (default niah-results.json)")
    p.add_argument("--plot", metavar="PNG", help="heatmap path (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no heatmap")
    p.add_argument("--thinking", choices=("off", "on"), default="off",
                   help="off: thinking disabled (default); on: the answer after the reasoning is scored")
    p.add_argument("--max-answer-tokens", type=int, default=32,
                   help="answer tokens: generated, and kept free in the context (default 32)")
    p.add_argument("--max-reasoning-tokens", type=int, default=1024,
                   help="reasoning budget with --thinking on (default 1024)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request (default 600)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32", help="with --model")
    p.add_argument("--threads", type=int, help="torch CPU threads (with --model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    lengths = parse_lengths(args.lengths)
    if args.depths is not None and args.depth_count is not None:
        raise ValueError("give --depths or --depth-count, not both")
    depths = parse_depths(args.depths) if args.depths is not None else depth_grid(args.depth_count or 5,
                                                                                   args.spacing)
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"--variant: expected one or more of {', '.join(VARIANTS)}, got {args.variant!r}")
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    if args.max_answer_tokens < 1:
        raise ValueError("--max-answer-tokens must be >= 1")
    if args.max_reasoning_tokens < 0:
        raise ValueError("--max-reasoning-tokens must be >= 0")
    if args.needles < 2 and any(v != "single" for v in variants):
        raise ValueError("--needles must be >= 2")
    if args.haystack_file and args.haystack:
        raise ValueError("give --haystack or --haystack-file, not both")
    haystack: str | Haystack = FileHaystack(args.haystack_file) if args.haystack_file else (args.haystack or "essay")
    if args.api_key and not args.url:
        raise ValueError("--api-key goes with --url")
    thinking = args.thinking == "on"
    budget = args.max_reasoning_tokens if thinking else None
    # with thinking on: room for the reasoning, the forced end of it (a grace of 64 tokens) and the answer
    max_tokens = args.max_answer_tokens + (budget + 64 if thinking else 0)
    if args.url:
        backend: Any = HTTPBackend(args.url, args.api_key, args.served_model_name, thinking=thinking,
                                   max_tokens=max_tokens, reasoning_budget=budget, timeout=args.timeout,
                                   answer_tokens=args.max_answer_tokens)
    else:
        if args.served_model_name:
            raise ValueError("--served-model-name goes with --url")
        if not os.path.isdir(args.model):
            raise ValueError(f"{args.model}: not a model directory")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        backend = InProcessBackend(args.model, thinking=thinking, max_tokens=max_tokens, reasoning_budget=budget,
                                   max_model_len=max(lengths) + max_tokens, dtype=args.dtype,
                                   answer_tokens=args.max_answer_tokens)
    try:
        doc = run_grid(backend, lengths, depths, variants, args.samples, args.seed, args.out,
                       value_type=args.value_type, haystack=haystack, num_needles=args.needles,
                       answer_tokens=args.max_answer_tokens, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"niah: interrupted; finished cases are in {args.out} (run again to resume)", file=sys.stderr)
        raise
    print(format_table(doc["summary"]))
    print(f"results: {args.out}")
    if not args.no_plot:
        from .niah_plot import plot_heatmap

        plot = args.plot or (os.path.splitext(args.out)[0] + ".png")
        title = f"NIAH {getattr(backend, 'model_id', '')} ({', '.join(variants)}, {args.value_type})"
        if plot_heatmap(doc["summary"], plot, title=title):
            print(f"heatmap: {plot}")
        else:
            print("heatmap skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0
