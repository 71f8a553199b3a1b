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


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=6), data=st.data())
def test_streamed_text_equals_the_full_decode_cut_at_the_first_stop(parts, data):
    ids = TOK.encode("".join(parts))
    full = TOK.decode(ids)
    stops = data.draw(st.lists(st.one_of(
        st.integers(0, max(0, len(full) - 1)).flatmap(lambda i: st.integers(1, 4).map(lambda n: full[i: i + n])),
        st.text("ab\u00e9\u4f60 .:", min_size=1, max_size=3)), max_size=3))
    stops = [s for s in stops if s]
    hits = [(full.find(s), s) for s in stops if full.find(s) >= 0]
    first = min(hits) if hits else None
    want = full if first is None else full[: first[0]]
    steps = data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)))
    tracker = _TextTracker(TOK, SamplingParams(stop=stops))
    shown, matched, n = "", None, 0
    for size in steps:
        n = min(len(ids), n + size)
        piece, matched = tracker.update(ids[:n], n == len(ids))
        shown += piece
        assert want.startswith(shown)
        if matched is not None or n == len(ids):
            break
    assert shown == want and tracker.text_len >= len(want)
    assert matched == (None if first is None else first[1]) or (matched is not None and full.find(matched) == first[0])
