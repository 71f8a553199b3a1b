"""The offline API's output text: incremental detokenization with stop strings, against a full decode."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hylm.chat import Tokenizer
from hylm.engine.llm import _TextTracker
from hylm.engine.sampling_params import SamplingParams

TOK = Tokenizer.from_dir(Path(__file__).resolve().parents[1] / "models" / "hylm-tiny")
# multi-byte characters split over several byte-level tokens, newlines, markup tokens
SAMPLES = ["The special magic number is: 4711.\n", "caf\u00e9 \u00fcber na\u00efve \u2014 ok", "\u4f60\u597d\u4e16\u754c",
           "<tool_call>\n<function=f>", "a\U0001F600b\U0001F389c", "<|im_end|>"]


def _reference(ids: list[int], cuts: list[int], stops: list[str]) -> tuple[str, str | None]:
    """What the output text must be, the slow way: decode the whole output again after every step (an
    incomplete last character left out) and cut at the earliest stop string in it, at the first step that
    has one."""
    for n in cuts:
        text = TOK.decode(ids[:n])
        if n < len(ids):
            text = text.rstrip("\ufffd")
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at = min(i for i, _ in hits)
            return text[:at], {s for i, s in hits if i == at}
    return TOK.decode(ids), None


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=6), data=st.data())
def test_streamed_text_equals_a_full_decode_per_step_cut_at_the_first_stop(parts, data):
    ids = TOK.encode("".join(parts))
    full = TOK.decode(ids)
    stops = data.draw(st.lists(st.one_of(
        st.integers(0, max(0, len(full) - 1)).flatmap(lambda i: st.integers(1, 4).map(lambda n: full[i: i + n])),
        st.text("ab\u00e9\u4f60\u597d .:", min_size=1, max_size=3)), max_size=3))
    stops = [s for s in stops if s]
    cuts, n = [], 0
    for size in data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids))):
        n = min(len(ids), n + size)
        if not cuts or cuts[-1] < n:
            cuts.append(n)
    want, want_stops = _reference(ids, cuts, stops)
    tracker = _TextTracker(TOK, SamplingParams(stop=stops))
    shown, matched = "", None
    for n in cuts:
        piece, matched = tracker.update(ids[:n], n == len(ids))
        shown += piece
        assert want.startswith(shown)  # nothing shown that a stop string removes later
        if matched is not None:
            break
    assert shown == want
    assert (matched is None) if want_stops is None else (matched in want_stops)
    assert tracker.text_len == len(want)
