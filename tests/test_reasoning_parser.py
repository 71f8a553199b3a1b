"""Reasoning parser (hylm.chat.reasoning): hand-written cases, streaming at every split, and property
tests against an independent regex reference that also accounts for every removed character."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hylm.chat.reasoning import ReasoningStreamParser, parse_reasoning, strip_think_tags

# (text, prompt_in_thinking, expected reasoning, expected content)
CASES = [
    # thinking on: output starts inside the reasoning
    ("I think.\n</think>\nAnswer", True, "I think.", "Answer"),
    ("I think.</think>Answer", True, "I think.", "Answer"),
    ("line1\nline2\n</think>\n\nAnswer\n", True, "line1\nline2", "\nAnswer\n"),  # one \n each side
    ("R\n\n</think>\n\nA", True, "R\n", "\nA"),
    ("x</think>", True, "x", None),  # reasoning, no answer
    ("x\n</think>\n", True, "x", None),
    ("</think>\nA", True, None, "A"),  # empty reasoning
    ("\n</think>\n", True, None, None),
    ("I was cut off", True, "I was cut off", None),  # truncated: everything is reasoning
    ("cut off\n", True, "cut off\n", None),  # kept verbatim when unterminated
    ("cut off </thi", True, "cut off </thi", None),
    ("", True, None, None),
    ("<think>\nR\n</think>\nA", True, "R", "A"),  # output repeats the open tag: stripped
    ("<think>R</think>A", True, "R", "A"),
    ("<think>\n\n</think>", True, None, None),
    ("<think>", True, None, None),
    ("<thi", True, "<thi", None),
    ("a</think>b</think>c", True, "a", "bc"),  # second </think> dropped from content
    ("a</think>b\n</think>\nc", True, "a", "b\n\nc"),  # newlines next to stray tags kept
    ("R <think> more</think>A", True, "R <think> more", "A"),  # no nesting; first close wins
    ("R</think>A<think>B</think>C", True, "R", "ABC"),
    ("R</think>x</th<think>ink>y", True, "R", "xy"),  # removal repeated until no tag remains
    ("\nR</think>A", True, "\nR", "A"),  # no leading-newline stripping without an output <think>
    ("Größe 🙂\n</think>\n答え", True, "Größe 🙂", "答え"),
    # thinking off: everything is content ...
    ("Answer", False, None, "Answer"),
    ("\nAnswer", False, None, "\nAnswer"),
    ("", False, None, None),
    ("Hi </think> there", False, None, "Hi  there"),  # orphan tag never reaches content
    ("A<think>B</think>C", False, None, "ABC"),
    ("Hi </th<think>ink> there", False, None, "Hi  there"),
    ("  <think>x</think>y", False, None, "  xy"),  # only a tag at the very start opens reasoning
    ("<thi", False, None, "<thi"),
    ("</think", False, None, "</think"),
    # ... unless the model still opens a reasoning block at the very start
    ("<think></think>Answer", False, None, "Answer"),
    ("<think>\n</think>\nAnswer", False, None, "Answer"),
    ("<think>\nR\n</think>\nAnswer", False, "R", "Answer"),
    ("<think>\nstill thinking", False, "still thinking", None),
    ("<think>", False, None, None),
    ("<think><think>x</think>", False, "<think>x", None),
]


def stream(text: str, prompt_in_thinking: bool, cuts: list[int]) -> tuple[str, str]:
    parser = ReasoningStreamParser(prompt_in_thinking)
    pieces = []
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        pieces += parser.feed(text[a:b])
    pieces += parser.finish()
    for kind, piece in pieces:
        assert kind in ("reasoning", "content")
        assert piece  # no empty pieces
    reasoning = "".join(p for k, p in pieces if k == "reasoning")
    content = "".join(p for k, p in pieces if k == "content")
    return reasoning, content


def as_stream(result: tuple[str | None, str | None]) -> tuple[str, str]:
    return result[0] or "", result[1] or ""


@pytest.mark.parametrize("text,thinking,reasoning,content", CASES)
def test_parse_cases(text, thinking, reasoning, content):
    assert parse_reasoning(text, thinking) == (reasoning, content)


@pytest.mark.parametrize("text,thinking,reasoning,content", CASES)
def test_stream_every_split(text, thinking, reasoning, content):
    expected = (reasoning or "", content or "")
    assert stream(text, thinking, []) == expected
    for i in range(len(text) + 1):
        assert stream(text, thinking, [i]) == expected, i
    assert stream(text, thinking, list(range(1, len(text)))) == expected  # single characters
    if len(text) <= 30:
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                assert stream(text, thinking, [i, j]) == expected, (i, j)


def test_stream_holds_back_partial_close_tag():
    p = ReasoningStreamParser(True)
    assert p.feed("abc</thi") == [("reasoning", "abc")]
    assert p.feed("nk>\nHello") == [("content", "Hello")]
    assert p.finish() == []
    p = ReasoningStreamParser(True)
    assert p.feed("abc\n") == [("reasoning", "abc")]  # the \n may precede </think>
    assert p.feed("def") == [("reasoning", "\ndef")]
    assert p.feed("</th") == []
    assert p.finish() == [("reasoning", "</th")]


def test_stream_content_chain_of_prefixes():
    p = ReasoningStreamParser(False)
    assert p.feed("x</th<thi") == [("content", "x")]
    assert p.feed("nk>") == []  # "<think>" removed, "</th" is pending again
    assert p.feed("ink>y") == [("content", "y")]
    assert p.finish() == []


def test_in_reasoning_flag():
    p = ReasoningStreamParser(True)
    assert p.in_reasoning
    p.feed("abc")
    assert p.in_reasoning
    p.feed("</think>")
    assert not p.in_reasoning
    q = ReasoningStreamParser(False)
    q.feed("Hi")
    assert not q.in_reasoning


def test_strip_think_tags():
    assert strip_think_tags("a<think>b</think>c") == "abc"
    assert strip_think_tags("<</think>think>") == ""
    assert strip_think_tags("<<think>") == "<"


# ------------------------------------------------------------------ independent reference + property

_TAG_RE = re.compile(r"<think>|</think>")


def reference(text: str, thinking: bool):
    """Regex re-implementation of the documented rules. Returns (reasoning, content, removed parts)
    where ``text == lead + reasoning + close + raw_content`` and content is raw_content with the
    ``removed_tags`` taken out."""
    m = re.match(r"<think>\n?", text)
    lead = m.group(0) if m else ""
    rest = text[len(lead):]
    close = ""
    if lead or thinking:
        mc = re.search(r"\n?</think>\n?", rest)
        if mc is None:
            reasoning, raw_content = rest, ""
            content_none = True
        else:
            reasoning, close, raw_content = rest[:mc.start()], mc.group(0), rest[mc.end():]
            content_none = False
    else:
        reasoning, raw_content, content_none = "", rest, False
    assert text == lead + reasoning + close + raw_content
    content, removed_tags = raw_content, []
    while True:  # remove tags until none remain (repeated global passes)
        found = _TAG_RE.findall(content)
        if not found:
            break
        removed_tags += found
        content = _TAG_RE.sub("", content)
    return reasoning, ("" if content_none else content), {"lead": lead, "close": close,
                                                          "tags": removed_tags}


FRAGMENTS = ["<think>", "</think>", "</thi", "<thi", "<th", "<", "</", ">", "think>", "ink>", "\n", "\n\n",
             "a", "b", "xyz", " ", "é", "中文", "🙂", "\r\n"]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=24).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=texts, thinking=st.booleans(), data=st.data())
def test_property_stream_equals_parse_and_accounting(text, thinking, data):
    reasoning, content = parse_reasoning(text, thinking)
    ref_r, ref_c, removed = reference(text, thinking)
    assert (reasoning or "", content or "") == (ref_r, ref_c)
    assert reasoning != "" and content != ""  # empties are None
    # no character lost or duplicated: reasoning + content + removed parts == input, as multisets
    removed_all = removed["lead"] + removed["close"] + "".join(removed["tags"])
    assert Counter(text) == Counter(ref_r) + Counter(ref_c) + Counter(removed_all)
    assert len(text) == len(ref_r) + len(ref_c) + len(removed_all)
    assert "<think>" not in ref_c and "</think>" not in ref_c
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert stream(text, thinking, cuts) == (ref_r, ref_c)


@settings(max_examples=100, deadline=None)
@given(text=texts, thinking=st.booleans())
def test_property_single_char_stream(text, thinking):
    assert stream(text, thinking, list(range(1, len(text)))) == as_stream(parse_reasoning(text, thinking))
