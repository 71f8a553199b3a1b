"""A seeded synthetic curriculum in the Nemotron 3 chat format (no external data).

Every example is a small chat (`Example.messages`, OpenAI-style dicts: assistant turns carry
`reasoning_content` and `tool_calls`) plus the tools declared in the system turn, the chat-template keyword
arguments it is rendered with (`enable_thinking`, `low_effort`) and the `answer` a scorer checks.

Tasks (`TASKS`):

* `needle_single`, `needle_multikey`, `needle_multivalue` -- RULER-style retrieval: "One of the special magic
  numbers for KEY is: VALUE." hidden in filler text made of simple sentences, then a question. multikey adds
  needles for other keys (distractors); multivalue hides several values for the one key and asks for all.
  Thinking off. Options: `filler_sentences` (exact count) or `context_tokens` (approximate haystack size,
  `TOKENS_PER_FILLER_SENTENCE` tokens per sentence), `num_needles` (multikey / multivalue).
* `niah` -- the prompt `hylm niah` asks (RULER variants single / multikey / multivalue / multiquery; numbers,
  words or UUIDs; noise or essay haystack), built with the harness's own functions; the answer is the value(s)
  alone. Options: `filler_sentences` (exact count of haystack sentences) or `token_range` (haystack tokens
  drawn from it, default (64, 640)), `num_needles`, `variant`, `value_type`, `haystack`.
* `arith_think` -- 2-4 digit add / sub / mul, a column-by-column trace in the reasoning, the number alone as
  the content. `arith_direct` -- thinking off, the number alone. `arith_low_effort` -- `low_effort=True`
  (the template appends "{reasoning effort: low}") and a one- or two-line trace.
* `tool_call` -- tools declared in the system turn; the user asks; the assistant emits one `<tool_call>`
  with the right name and arguments; a tool result (JSON) follows; the assistant answers from it.
  Thinking on or off at random (with thinking on both assistant turns reason briefly).
* `copy`, `reverse`, `count`, `sort` -- short instruction following on a list of words or numbers. Thinking off.

Determinism: `generate_example(task, rng)` consumes only the given `random.Random`, so the same seed gives
the same example on every run and platform. `example_for_seed(seed, mix)` picks a task with
`random.Random(seed)` and continues with that rng. Train / held-out split by seed range: training uses seeds
`0 <= seed < TRAIN_SEED_LIMIT` (10**6); evaluation uses seeds `>= EVAL_SEED_BASE` (10**9); the two never meet.

Rendering for training: see `render_for_training` (loss mask on assistant-generated tokens only).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

TRAIN_SEED_LIMIT = 10**6
EVAL_SEED_BASE = 10**9
IM_END = "<|im_end|>"
# filler sentences average about this many tokens with a curriculum-trained tokenizer (used to turn
# `context_tokens` into a sentence count; the eval harness sizes haystacks exactly with the real tokenizer)
TOKENS_PER_FILLER_SENTENCE = 9


@dataclass
class Example:
    task: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    template_kwargs: dict[str, Any]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def assistant_turns(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "messages": self.messages, "tools": self.tools,
                "template_kwargs": self.template_kwargs, "answer": self.answer, "meta": self.meta}


# ---------------------------------------------------------------------------------------------- words
ADJECTIVES = ("quiet", "bright", "small", "green", "happy", "cold", "brave", "soft", "old", "tall", "red", "calm",
              "quick", "lazy", "blue", "warm", "dark", "young", "loud", "gentle", "wild", "clever", "round",
              "sharp", "golden", "silver", "tiny", "huge", "sweet", "proud", "busy", "shy", "fresh", "plain")
NOUNS = ("river", "garden", "lamp", "tiger", "forest", "window", "castle", "pencil", "cloud", "bridge", "apple",
         "mountain", "ocean", "rabbit", "engine", "village", "candle", "dragon", "mirror", "harbor", "violin",
         "meadow", "falcon", "lantern", "wagon", "island", "garage", "teacher", "farmer", "cat", "dog", "bird",
         "horse", "ship", "train", "road", "stone", "flower", "tree", "house", "book", "song", "star", "moon")
VERBS = ("sees", "likes", "finds", "paints", "follows", "carries", "watches", "builds", "visits", "cleans",
         "moves", "holds", "passes", "reads", "opens", "draws")
PLACES = ("the park", "the market", "the hill", "the school", "the station", "the beach", "the library",
          "the farm", "the city", "the valley", "the lake", "the road")
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Leo",
         "Maya", "Nora", "Omar", "Paul", "Rosa", "Sam", "Tara", "Victor")
TIMES = ("In the morning", "At noon", "In the evening", "At night", "Every day", "On Sunday", "Later",
         "Today", "Yesterday", "Once")
CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Lisbon", "Oslo", "Vienna", "Prague", "Dublin",
          "Cairo", "Lima", "Seoul", "Sydney", "Toronto", "Boston", "Denver", "Mumbai", "Nairobi")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK")
SYMBOLS = ("ACME", "BOLT", "CORE", "DYNA", "EPIC", "FLUX", "GRID", "HALO", "IRIS", "JADE")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a careful assistant. Answer precisely.",
                  "You are a concise assistant.")


def _filler_sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    a, n, n2 = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    if kind == 0:
        return f"The {a} {n} {rng.choice(VERBS)} the {n2}."
    if kind == 1:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} a {a} {n} near {rng.choice(PLACES)}."
    if kind == 2:
        return f"{rng.choice(TIMES)}, the {n} is {a}."
    if kind == 3:
        return f"A {a} {n} and a {rng.choice(ADJECTIVES)} {n2} stay in {rng.choice(PLACES)}."
    if kind == 4:
        return f"{rng.choice(NAMES)} and {rng.choice(NAMES)} walk to {rng.choice(PLACES)}."
    return f"The {n} is {a} and the {n2} is {rng.choice(ADJECTIVES)}."


def filler_sentences(rng: random.Random, count: int) -> list[str]:
    return [_filler_sentence(rng) for _ in range(count)]


def _maybe_system(rng: random.Random, p: float = 0.3) -> list[dict[str, Any]]:
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < p else []


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _assistant(content: str, reasoning: str | None = None,
               tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if tool_calls:
        m["tool_calls"] = tool_calls
    return m


# ---------------------------------------------------------------------------------------------- needles
def _needle_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _needle_value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))  # 7 digits, as RULER
    return f"{rng.choice(ADJECTIVES)}{rng.choice(NOUNS)}"  # a made-up compound word: "goldenfalcon"


def _haystack_size(rng: random.Random, opts: Mapping[str, Any]) -> int:
    if opts.get("filler_sentences") is not None:
        return max(0, int(opts["filler_sentences"]))
    if opts.get("context_tokens") is not None:
        return max(1, int(opts["context_tokens"]) // TOKENS_PER_FILLER_SENTENCE)
    lo, hi = opts.get("filler_range", (4, 30))
    return rng.randint(lo, hi)


def _needle_example(task: str, rng: random.Random, opts: Mapping[str, Any]) -> Example:
    kind = opts.get("value_kind") or rng.choice(("number", "number", "word"))
    noun = "number" if kind == "number" else "word"
    n_sent = _haystack_size(rng, opts)
    key = _needle_key(rng)
    if task == "needle_single":
        needles = [(key, _needle_value(rng, kind))]
    elif task == "needle_multikey":
        count = int(opts.get("num_needles") or rng.randint(2, 4))
        keys = [key]
        while len(keys) < count:
            k = _needle_key(rng)
            if k not in keys:
                keys.append(k)
        needles = [(k, _needle_value(rng, kind)) for k in keys]
    elif task == "needle_multivalue":
        count = int(opts.get("num_needles") or rng.randint(2, 3))
        values: list[str] = []
        while len(values) < count:
            v = _needle_value(rng, kind)
            if v not in values:
                values.append(v)
        needles = [(key, v) for v in values]
    else:
        raise ValueError(f"not a needle task: {task}")
    # where each needle goes, as a fraction of the haystack: drawn before the filler so that, for a fixed
    # seed, the haystack for n sentences is a prefix of the one for n + 1 (lengths grow monotonically)
    depths = [rng.random() for _ in needles]
    order = list(range(len(needles)))
    rng.shuffle(order)
    filler_rng = random.Random(rng.getrandbits(64))
    sentences = filler_sentences(filler_rng, n_sent)
    placed = sorted(((round(depths[j] * n_sent), k) for k, j in enumerate(order)))
    text_parts: list[str] = []
    pos = 0
    for at, k in placed:
        text_parts.extend(sentences[pos:at])
        pos = at
        nk, nv = needles[k]
        text_parts.append(f"One of the special magic {noun}s for {nk} is: {nv}.")
    text_parts.extend(sentences[pos:])
    haystack = " ".join(text_parts)

    if task == "needle_multivalue":
        vals = [v for _, v in needles]
        question = (f"What are all the special magic {noun}s for {key} mentioned in the text above? "
                    f"List them in the order they appear.")
        appear = [needles[k][1] for _, k in placed]
        answer = ", ".join(appear)
        content = f"The special magic {noun}s for {key} are: {answer}."
        values = appear
    else:
        value = needles[0][1]
        question = f"What is the special magic {noun} for {key} mentioned in the text above?"
        answer = value
        content = f"The special magic {noun} for {key} is: {value}."
        values = [value]
        vals = values
    intro = rng.choice(("Read the following text and remember the special magic {n}s in it.",
                        "Some special magic {n}s are hidden in the text below. Memorize them.",
                        "Here is a long text. Pay attention to the special magic {n}s."))
    prompt = f"{intro.format(n=noun)}\n\n{haystack}\n\n{question}"
    msgs = _maybe_system(rng, 0.2) + [_user(prompt), _assistant(content)]
    return Example(task, msgs, None, {"enable_thinking": False}, answer,
                   {"key": key, "values": values, "all_values": vals, "needles": needles,
                    "filler_sentences": n_sent, "value_kind": kind})


NIAH_VARIANTS = {"single": 0.4, "multikey": 0.25, "multivalue": 0.15, "multiquery": 0.2}
NIAH_VALUE_TYPES = {"numbers": 0.7, "words": 0.2, "uuids": 0.1}
NIAH_HAYSTACKS = ("noise", "essay")
# haystack tokens per sentence unit with the curriculum tokenizer (measured on hylm-tiny's: 7.6 and 31.5); only
# used to turn a token target into a unit count when sampling, `hylm niah` sizes prompts with the tokenizer
NIAH_TOKENS_PER_UNIT = {"noise": 7.6, "essay": 31.5}


def _niah_example(task: str, rng: random.Random, opts: Mapping[str, Any]) -> Example:
    """A case of `hylm niah`'s prompt, built by the harness's own functions (needles, gkamradt placement,
    instruction and question), so that what the model learns is what the harness asks. The answer is what
    the question asks for: the value alone, or the values comma-separated (multivalue in the order they
    appear, multiquery in the order of the keys asked)."""
    from ..eval.haystack import make_haystack
    from ..eval.niah import make_needles, place_needles, render_messages

    def pick(weights: Mapping[str, float], forced: Any) -> str:
        return forced or rng.choices(list(weights), weights=list(weights.values()))[0]

    variant = pick(NIAH_VARIANTS, opts.get("variant"))
    value_type = pick(NIAH_VALUE_TYPES, opts.get("value_type"))
    haystack = opts.get("haystack") or rng.choice(NIAH_HAYSTACKS)
    num_needles = int(opts.get("num_needles") or rng.randint(2, 4))
    depth = round(rng.uniform(0.0, 100.0), 1)
    needle_seed, hay_seed = rng.getrandbits(32), rng.getrandbits(32)
    if opts.get("filler_sentences") is not None:
        n_units = max(0, int(opts["filler_sentences"]))
    else:
        lo, hi = opts.get("token_range", (64, 640))
        n_units = max(1, round(rng.randint(lo, hi) / NIAH_TOKENS_PER_UNIT[haystack]))
    needles, expected, question = make_needles(variant, value_type, needle_seed, 0, depth, num_needles)
    context = place_needles(make_haystack(haystack, hay_seed).units(n_units), needles).rstrip()
    if variant == "multivalue":
        expected = [nd.value for nd in sorted(needles, key=lambda nd: nd.offset)]
    answer = ", ".join(expected)
    msgs = render_messages(context, question, value_type) + [_assistant(answer)]
    return Example(task, msgs, None, {"enable_thinking": False}, answer,
                   {"values": expected, "variant": variant, "value_type": value_type, "haystack": haystack,
                    "depth": depth, "filler_sentences": n_units})


# ---------------------------------------------------------------------------------------------- arithmetic
def _digits(n: int) -> list[int]:
    """Least significant first."""
    return [int(c) for c in reversed(str(n))]


def _spaced(ds: list[int]) -> str:
    return " ".join(str(d) for d in ds)


def _add_trace(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    n = max(len(da), len(db))
    lines = [f"Add {a} and {b} column by column, starting from the ones."]
    carry, written = 0, []
    for i in range(n):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        lines.append(f"Column {i + 1}: {x} + {y} + {carry} = {s}. Write {s % 10}, carry {s // 10}.")
        written.append(s % 10)
        carry = s // 10
    if carry:
        lines.append(f"Column {n + 1}: carry {carry}. Write {carry}.")
        written.append(carry)
    result = a + b
    lines.append(f"Digits written: {_spaced(written)}. Reversed: {result}.")
    return lines


def _sub_trace(a: int, b: int) -> list[str]:
    """a - b for a >= b."""
    da, db = _digits(a), _digits(b)
    lines = [f"Subtract {b} from {a} column by column, starting from the ones."]
    borrow, written = 0, []
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        d = x - y - borrow
        if d < 0:
            lines.append(f"Column {i + 1}: {x} - {y} - {borrow} is negative, so borrow: "
                         f"{x + 10} - {y} - {borrow} = {d + 10}. Write {d + 10}, borrow 1.")
            written.append(d + 10)
            borrow = 1
        else:
            lines.append(f"Column {i + 1}: {x} - {y} - {borrow} = {d}. Write {d}, borrow 0.")
            written.append(d)
            borrow = 0
    raw = "".join(str(d) for d in reversed(written))
    lines.append(f"Digits written: {_spaced(written)}. Reversed: {raw}.")
    if raw != str(a - b):
        lines.append(f"Without leading zeros: {a - b}.")
    return lines


def _mul_one_trace(a: int, d: int) -> list[str]:
    da = _digits(a)
    lines = [f"{a} * {d}:"]
    carry, written = 0, []
    for i, x in enumerate(da):
        p = x * d + carry
        lines.append(f"Column {i + 1}: {x} * {d} + {carry} = {p}. Write {p % 10}, carry {p // 10}.")
        written.append(p % 10)
        carry = p // 10
    if carry:
        lines.append(f"Column {len(da) + 1}: carry {carry}. Write {carry}.")
        written.append(carry)
    raw = "".join(str(x) for x in reversed(written))
    lines.append(f"Digits written: {_spaced(written)}. Reversed: {raw}.")
    if raw != str(a * d):
        lines.append(f"Without leading zeros: {a * d}.")
    return lines


def _mul_trace(a: int, b: int) -> list[str]:
    db = _digits(b)
    lines = [f"Multiply {a} by {b}, one digit of {b} at a time."]
    partials = []
    for i, d in enumerate(db):
        lines.extend(_mul_one_trace(a, d))
        p = a * d * 10**i
        if i:
            lines.append(f"Shift by {i}: {a} * {d * 10**i} = {p}.")
        partials.append(p)
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"Add the partial products {total} and {p}.")
        lines.extend(_add_trace(total, p)[1:])
        total += p
    return lines


def _arith_problem(rng: random.Random, opts: Mapping[str, Any]) -> tuple[int, str, int]:
    op = opts.get("op") or rng.choice(("+", "-", "*"))
    lo_d, hi_d = opts.get("digits", (2, 4))
    a = rng.randrange(10 ** (lo_d - 1), 10 ** rng.randint(lo_d, hi_d))
    if op == "*":  # a has at most `mul_max_digits` digits in all (default 5: 4 x 1 or 3 x 2 digits)
        mb = int(opts.get("mul_max_digits_b", 2))
        nb = rng.randint(1, mb)
        b = rng.randrange(2 if nb == 1 else 10 ** (nb - 1), 10 ** nb)
        max_a = max(1, min(hi_d, int(opts.get("mul_max_digits", 5)) - nb))
        a = rng.randrange(10 ** (min(lo_d, max_a) - 1), 10 ** rng.randint(min(lo_d, max_a), max_a))
    else:
        b = rng.randrange(10 ** (lo_d - 1), 10 ** rng.randint(lo_d, hi_d))
    return a, op, b


def _arith_value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_question(rng: random.Random, a: int, op: str, b: int) -> str:
    expr = f"{a} {op} {b}"
    return rng.choice((f"What is {expr}?", f"Compute {expr}.", f"Calculate {expr}.", f"{expr} = ?",
                       f"Please work out {expr}."))


def arith_trace(a: int, op: str, b: int) -> str:
    """The step-by-step reasoning for `a op b` (ends with the result line)."""
    if op == "+":
        lines = _add_trace(a, b)
    elif op == "-":
        if a >= b:
            lines = _sub_trace(a, b)
        else:
            lines = [f"{a} is less than {b}, so compute {b} - {a} and make it negative."] + _sub_trace(b, a)
    elif op == "*":
        lines = _mul_trace(a, b)
    else:
        raise ValueError(f"unknown operator {op!r}")
    lines.append(f"So {a} {op} {b} = {_arith_value(a, op, b)}.")
    return "\n".join(lines)


def arith_low_effort_trace(a: int, op: str, b: int) -> str:
    """A short trace: the column digits (add / sub) or the partial products (mul)."""
    r = _arith_value(a, op, b)
    if op == "*":
        parts = [f"{a} * {d * 10**i} = {a * d * 10**i}" for i, d in enumerate(_digits(b))]
        return parts[0] + "." if len(parts) == 1 else "; ".join(parts) + f"; sum = {r}."
    if op == "+":
        return f"Columns from the right give {_spaced(_digits(r))}, so {a} + {b} = {r}."
    if a >= b:
        return f"Columns from the right give {_spaced(_digits(r))}, so {a} - {b} = {r}."
    return (f"{a} < {b}, so negate {b} - {a}. Columns from the right give {_spaced(_digits(-r))}, "
            f"so {a} - {b} = {r}.")


def _arith_example(task: str, rng: random.Random, opts: Mapping[str, Any]) -> Example:
    a, op, b = _arith_problem(rng, opts)
    value = _arith_value(a, op, b)
    question = _arith_question(rng, a, op, b)
    answer = str(value)
    sys = _maybe_system(rng, 0.2)
    if task == "arith_think":
        msgs = sys + [_user(question), _assistant(answer, reasoning=arith_trace(a, op, b))]
        kwargs = {"enable_thinking": True}
    elif task == "arith_low_effort":
        msgs = sys + [_user(question), _assistant(answer, reasoning=arith_low_effort_trace(a, op, b))]
        kwargs = {"enable_thinking": True, "low_effort": True}
    elif task == "arith_direct":
        msgs = sys + [_user(question), _assistant(answer)]
        kwargs = {"enable_thinking": False}
    else:
        raise ValueError(f"not an arithmetic task: {task}")
    return Example(task, msgs, None, kwargs, answer, {"a": a, "op": op, "b": b})


# ---------------------------------------------------------------------------------------------- tools
def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": _fn("get_weather", "Get the current weather in a city.", {
        "city": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
        ["city", "unit"]),
    "convert_currency": _fn("convert_currency", "Convert an amount of money from one currency to another.", {
        "amount": {"type": "number", "description": "The amount to convert"},
        "source": {"type": "string", "description": "Currency code to convert from"},
        "target": {"type": "string", "description": "Currency code to convert to"}},
        ["amount", "source", "target"]),
    "get_stock_price": _fn("get_stock_price", "Get the latest price of a stock.", {
        "symbol": {"type": "string", "description": "The ticker symbol"}}, ["symbol"]),
    "get_population": _fn("get_population", "Get the population of a city.", {
        "city": {"type": "string", "description": "The city name"}}, ["city"]),
    "get_time": _fn("get_time", "Get the local time in a city.", {
        "city": {"type": "string", "description": "The city name"}}, ["city"]),
    "add_numbers": _fn("add_numbers", "Add two integers.", {
        "a": {"type": "integer", "description": "First number"},
        "b": {"type": "integer", "description": "Second number"}}, ["a", "b"]),
}


def _tool_scenario(name: str, rng: random.Random) -> tuple[str, dict[str, Any], str, dict[str, Any], str,
                                                             list[str], str]:
    """(question, arguments, reasoning, tool result, final answer, strings the answer must contain,
    final reasoning)."""
    if name == "get_weather":
        city, unit = rng.choice(CITIES), rng.choice(("celsius", "fahrenheit"))
        q = rng.choice((f"What is the weather like in {city}? Use {unit}.",
                        f"How warm is it in {city} right now, in {unit}?",
                        f"Tell me the current weather in {city} in {unit}."))
        temp = rng.randint(-5, 35) if unit == "celsius" else rng.randint(20, 95)
        cond = rng.choice(CONDITIONS)
        result = {"city": city, "temperature": temp, "unit": unit, "condition": cond}
        ans = f"It is {temp} degrees {unit} and {cond} in {city}."
        return (q, {"city": city, "unit": unit},
                f"The user wants the weather in {city} in {unit}. I will call get_weather.",
                result, ans, [str(temp), cond], f"The tool says {temp} degrees and {cond}.")
    if name == "convert_currency":
        amount = rng.randint(1, 999)
        src, dst = rng.sample(CURRENCIES, 2)
        q = rng.choice((f"Convert {amount} {src} to {dst}.", f"How much is {amount} {src} in {dst}?"))
        rate = rng.randint(20, 300) / 100
        converted = round(amount * rate, 2)
        result = {"amount": amount, "source": src, "target": dst, "result": converted}
        return (q, {"amount": amount, "source": src, "target": dst},
                f"The user wants to convert {amount} {src} to {dst}. I will call convert_currency.",
                result, f"{amount} {src} is {converted} {dst}.", [str(converted)],
                f"The tool returned {converted}.")
    if name == "get_stock_price":
        sym = rng.choice(SYMBOLS)
        q = rng.choice((f"What is the stock price of {sym}?", f"How much does one {sym} share cost now?"))
        price = rng.randint(100, 99999) / 100
        return (q, {"symbol": sym}, f"The user asks for the price of {sym}. I will call get_stock_price.",
                {"symbol": sym, "price": price}, f"One {sym} share costs {price}.", [str(price)],
                f"The price is {price}.")
    if name == "get_population":
        city = rng.choice(CITIES)
        q = rng.choice((f"How many people live in {city}?", f"What is the population of {city}?"))
        pop = rng.randint(100_000, 9_999_999)
        return (q, {"city": city}, f"The user asks about the population of {city}. I will call get_population.",
                {"city": city, "population": pop}, f"{city} has a population of {pop}.", [str(pop)],
                f"The tool says {pop}.")
    if name == "get_time":
        city = rng.choice(CITIES)
        q = rng.choice((f"What time is it in {city}?", f"Tell me the local time in {city}."))
        t = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        return (q, {"city": city}, f"The user wants the local time in {city}. I will call get_time.",
                {"city": city, "time": t}, f"It is {t} in {city}.", [t], f"The time is {t}.")
    if name == "add_numbers":
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
        q = f"Use the tool to add {a} and {b}."
        return (q, {"a": a, "b": b}, f"The user wants {a} + {b} from the tool. I will call add_numbers.",
                {"result": a + b}, f"The sum is {a + b}.", [str(a + b)], f"The tool returned {a + b}.")
    raise ValueError(f"unknown tool {name!r}")


def _tool_example(task: str, rng: random.Random, opts: Mapping[str, Any]) -> Example:
    names = sorted(TOOLS)
    target = opts.get("tool") or rng.choice(names)
    others = [n for n in names if n != target]
    extra = int(opts.get("max_extra_tools", 1))  # distractor tools declared besides the right one
    declared = [target] + rng.sample(others, rng.randint(0, min(extra, len(others))))
    rng.shuffle(declared)
    tools = [TOOLS[n] for n in declared]
    question, args, reasoning, result, final, must, final_reasoning = _tool_scenario(target, rng)
    think = opts["enable_thinking"] if opts.get("enable_thinking") is not None else rng.random() < 0.5
    call = {"type": "function", "function": {"name": target, "arguments": args}}
    msgs = _maybe_system(rng, 0.3) + [
        _user(question),
        _assistant("", reasoning=reasoning if think else None, tool_calls=[call]),
        {"role": "tool", "content": json.dumps(result)},
        _assistant(final, reasoning=final_reasoning if think else None),
    ]
    answer = json.dumps({"name": target, "arguments": args}, sort_keys=True)
    return Example(task, msgs, tools, {"enable_thinking": think}, answer,
                   {"tool_name": target, "arguments": args, "final_answer": final, "final_contains": must})


# ---------------------------------------------------------------------------------------------- instructions
def _items(rng: random.Random, opts: Mapping[str, Any]) -> tuple[list[str], str]:
    lo, hi = opts.get("list_len", (3, 7))
    n = rng.randint(lo, hi)
    kind = opts.get("item_kind") or rng.choice(("word", "number"))
    if kind == "number":
        return [str(rng.randint(0, 99)) for _ in range(n)], kind
    return [rng.choice(NOUNS) for _ in range(n)], kind


def _instruction_example(task: str, rng: random.Random, opts: Mapping[str, Any]) -> Example:
    items, kind = _items(rng, opts)
    shown = ", ".join(items)
    meta: dict[str, Any] = {"items": items}
    if task == "copy":
        text = " ".join(items) if kind == "word" else shown
        q = rng.choice((f"Repeat exactly: {text}", f"Copy this text: {text}", f"Say back exactly: {text}"))
        answer = text
    elif task == "reverse":
        q = rng.choice((f"Reverse the order of this list: {shown}", f"Write this list backwards: {shown}"))
        answer = ", ".join(reversed(items))
    elif task == "count":
        if rng.random() < 0.5:
            q = rng.choice((f"How many items are in this list: {shown}?", f"Count the items: {shown}"))
            answer = str(len(items))
        else:
            probe = rng.choice(items)
            if rng.random() < 0.5:  # sometimes the probed item is repeated, sometimes absent
                items = items + [probe]
                rng.shuffle(items)
            shown = ", ".join(items)
            q = f"How many times does {probe} appear in this list: {shown}?"
            answer = str(items.count(probe))
            meta = {"items": items, "probe": probe}
    elif task == "sort":
        desc = rng.random() < 0.3
        if kind == "number":
            ordered = sorted(items, key=int, reverse=desc)
            how = "from largest to smallest" if desc else "from smallest to largest"
        else:
            ordered = sorted(items, reverse=desc)
            how = "in reverse alphabetical order" if desc else "in alphabetical order"
        q = f"Sort this list {how}: {shown}"
        answer = ", ".join(ordered)
    else:
        raise ValueError(f"not an instruction task: {task}")
    msgs = _maybe_system(rng, 0.2) + [_user(q), _assistant(answer)]
    return Example(task, msgs, None, {"enable_thinking": False}, answer, meta)


# ---------------------------------------------------------------------------------------------- registry
_GENERATORS: dict[str, Callable[[str, random.Random, Mapping[str, Any]], Example]] = {
    "needle_single": _needle_example,
    "needle_multikey": _needle_example,
    "needle_multivalue": _needle_example,
    "niah": _niah_example,
    "arith_think": _arith_example,
    "arith_direct": _arith_example,
    "arith_low_effort": _arith_example,
    "tool_call": _tool_example,
    "copy": _instruction_example,
    "reverse": _instruction_example,
    "count": _instruction_example,
    "sort": _instruction_example,
}
TASKS: tuple[str, ...] = tuple(_GENERATORS)
NEEDLE_TASKS = ("needle_single", "needle_multikey", "needle_multivalue", "niah")
DEFAULT_MIX: dict[str, float] = {
    "needle_single": 1.0, "needle_multikey": 1.0, "needle_multivalue": 1.0, "niah": 1.0,
    "arith_think": 1.5, "arith_direct": 1.0, "arith_low_effort": 1.0,
    "tool_call": 1.5, "copy": 0.75, "reverse": 0.75, "count": 0.75, "sort": 0.75,
}


def generate_example(task: str, rng: random.Random, **opts: Any) -> Example:
    """One example of `task` drawn with `rng` (a `random.Random`). Options per task: see the module doc."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    return _GENERATORS[task](task, rng, opts)


def check_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = [t for t in mix if t not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown task(s) in mix: {', '.join(unknown)} (tasks: {', '.join(TASKS)})")
    if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("mix weights must be >= 0 with a positive sum")
    return {t: float(w) for t, w in mix.items() if w > 0}


def example_for_seed(seed: int, mix: Mapping[str, float] | None = None,
                     task_opts: Mapping[str, Mapping[str, Any]] | None = None) -> Example:
    """The example of one seed: the task drawn from `mix` by `random.Random(seed)`, then the example."""
    mix = check_mix(mix)
    rng = random.Random(seed)
    tasks = list(mix)
    task = rng.choices(tasks, weights=[mix[t] for t in tasks])[0]
    ex = generate_example(task, rng, **dict((task_opts or {}).get(task, {})))
    ex.seed = seed
    return ex


def iter_examples(seed: int = 0, mix: Mapping[str, float] | None = None, start: int = 0,
                  task_opts: Mapping[str, Mapping[str, Any]] | None = None,
                  held_out: bool = False) -> Iterator[Example]:
    """Deterministic stream of examples. Example i uses seed `seed + start + i`, wrapped into the training
    range [0, TRAIN_SEED_LIMIT) -- or, with held_out=True, offset into the evaluation range
    (EVAL_SEED_BASE + ...)."""
    mix = check_mix(mix)
    i = start
    while True:
        yield example_for_seed(example_seed(seed, i, held_out), mix, task_opts)
        i += 1


def example_seed(seed: int, index: int, held_out: bool = False) -> int:
    if held_out:
        return EVAL_SEED_BASE + seed + index
    return (seed + index) % TRAIN_SEED_LIMIT


# ---------------------------------------------------------------------------------------------- rendering
def assistant_spans(example: Example, template: Any, eot: str = IM_END) -> tuple[str, list[tuple[int, int]]]:
    """(full conversation text, [(start, end) character spans of what each assistant turn generates]).

    How the boundaries are found (no knowledge of the template's markup is needed): for assistant message i,
      prompt_i = render(messages[:i], add_generation_prompt=True)    -- what the model is given
      upto_i   = render(messages[:i + 1], add_generation_prompt=False)
    upto_i must extend prompt_i, and the full rendering must extend upto_i (checked; a template that
    re-renders earlier turns differently, e.g. `low_effort` on a conversation with several user turns,
    raises ValueError). The turn generates upto_i[len(prompt_i):] up to and including its last `eot`
    (`<|im_end|>`); the newline the template writes after it belongs to the next prompt. So with thinking on
    the span is "REASONING\\n</think>\\nCONTENT CALLS<|im_end|>" (the "<think>\\n" is in the prompt) and with
    thinking off "CONTENT CALLS<|im_end|>" (after the prompt's "<think></think>")."""
    kw = dict(example.template_kwargs)
    msgs, tools = example.messages, example.tools
    full = template.render(msgs, tools=tools, add_generation_prompt=False, **kw)
    spans = []
    for i in example.assistant_turns():
        prompt = template.render(msgs[:i], tools=tools, add_generation_prompt=True, **kw)
        upto = template.render(msgs[: i + 1], tools=tools, add_generation_prompt=False, **kw)
        if not upto.startswith(prompt):
            raise ValueError(f"{example.task}: assistant turn {i} does not continue its generation prompt "
                             f"(does the message match the thinking mode {kw}?)")
        if not full.startswith(upto):
            raise ValueError(f"{example.task}: the template renders turns before {i} differently in the full "
                             f"conversation; cannot find the assistant tokens")
        end = upto.rfind(eot)
        if end < len(prompt):
            raise ValueError(f"{example.task}: assistant turn {i} does not end with {eot!r}")
        spans.append((len(prompt), end + len(eot)))
    return full, spans


def render_for_training(example: Example, template: Any, tokenizer: Any, eot: str = IM_END
                        ) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of the whole conversation; mask 1 exactly on the tokens assistant turns
    generate (reasoning, content, tool calls and the closing <|im_end|>; see `assistant_spans`).

    The text is tokenized piece by piece -- prompt segments and assistant segments separately -- so no token
    straddles a boundary and the first prompt tokenizes exactly as it does at inference time. With the
    Nemotron template every boundary follows a special token or a newline, where a byte-level BPE splits
    anyway, so the result equals tokenizing the whole text."""
    full, spans = assistant_spans(example, template, eot)
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, end in spans:
        for text, m in ((full[pos:start], 0), (full[start:end], 1)):
            if text:
                seg = tokenizer.encode(text)
                ids.extend(seg)
                mask.extend([m] * len(seg))
        pos = end
    if pos < len(full):
        seg = tokenizer.encode(full[pos:])
        ids.extend(seg)
        mask.extend([0] * len(seg))
    return ids, mask


def render_prompt(example: Example, template: Any, turn: int | None = None) -> str:
    """The generation prompt for assistant message `turn` (default: the last assistant message)."""
    turns = example.assistant_turns()
    i = turns[-1] if turn is None else turn
    if i not in turns:
        raise ValueError(f"message {i} is not an assistant turn")
    return template.render(example.messages[:i], tools=example.tools, add_generation_prompt=True,
                           **example.template_kwargs)


def corpus_texts(n: int, seed: int = 0, mix: Mapping[str, float] | None = None, template: Any = None,
                 task_opts: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[str]:
    """Rendered conversations for tokenizer training (the bundled template when none is given)."""
    if template is None:
        from ..chat.template import ChatTemplate

        template = ChatTemplate.bundled()
    for ex, _ in zip(iter_examples(seed, mix, task_opts=task_opts), range(n)):
        yield template.render(ex.messages, tools=ex.tools, add_generation_prompt=False, **ex.template_kwargs)
