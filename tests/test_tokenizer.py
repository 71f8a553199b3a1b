"""Tokenizer wrapper and the streaming detokenizer, on a small byte-level BPE with Nemotron's special ids."""

from __future__ import annotations

import json

import pytest
from chat_fixtures import EXPECTED_IDS, SPECIAL_TOKENS, build_test_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hylm.chat import IncrementalDetokenizer, Tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


# ------------------------------------------------------------------------------------------ Tokenizer
def test_special_token_ids(tok):
    for text, want in EXPECTED_IDS.items():
        assert tok.token_to_id(text) == want
        assert tok.id_to_token(want) == text
    assert tok.special_ids == set(range(len(SPECIAL_TOKENS)))
    assert tok.bos_token_id == 1 and tok.bos_token == "<s>"
    assert tok.vocab_size == 600
    assert tok.token_to_id("<definitely not a token>") is None


def test_eos_ids_union_of_config_and_generation_config(tok, tmp_path):
    assert tok.eos_token_ids == [11, 2]  # tokenizer_config's <|im_end|>, then generation_config's [2, 11]
    d = build_test_tokenizer(tmp_path / "a", eos_token="</s>", generation_eos=[2, 11])
    assert Tokenizer.from_dir(d).eos_token_ids == [2, 11]
    d = build_test_tokenizer(tmp_path / "b", eos_token="</s>")
    (d / "generation_config.json").unlink()
    t = Tokenizer.from_dir(d)
    assert t.eos_token_ids == [2] and t.eos_token == "</s>"
    d = build_test_tokenizer(tmp_path / "c", generation_eos=[2])
    cfg = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": 2}))
    assert Tokenizer.from_dir(d).eos_token_ids == [11, 2]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)


def test_special_tokens_in_text_are_single_ids(tok):
    assert tok.encode("<|im_start|>") == [10]
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nok</think>")
    assert ids[0] == 10 and ids.count(10) == 2 and ids.count(11) == 1 and 12 in ids and 13 in ids
    assert tok.decode(ids, skip_special_tokens=False) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nok</think>"
    assert tok.decode(ids) == "user\nHi\nassistant\n\nok"
    assert tok.encode("") == []
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_matches_transformers_encoding(ckpt, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    for text in ["Hello world", "<|im_start|>user\nWeather in 東京? 🌧️<|im_end|>", " 12345 \n\n  x"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_roundtrip_random_unicode(tok, text):
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    if not any(s in text for s in SPECIAL_TOKENS):
        assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------------------ detokenizer
def _stream(tok, ids, groups=None, skip_special_tokens=True):
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces, i, g = [], 0, 0
    while i < len(ids):
        n = groups[g % len(groups)] if groups else 1
        g += 1
        pieces.append(det.add(ids[i:i + n]))
        i += n
    pieces.append(det.finish())
    return pieces, det


SPLIT_TEXT = "Parrot 🦜, fraktur 𝔘𝔫𝔦, family 👨‍👩‍👧, 漢字かな交じり文, Ελληνικά, done."


def test_token_by_token_never_breaks_characters(tok):
    ids = tok.encode(SPLIT_TEXT)
    # the test text really has characters spread over several byte tokens
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    pieces, det = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == SPLIT_TEXT
    assert not any(REPLACEMENT in p for p in pieces)
    assert det.num_tokens == len(ids) and det.text_len == len(SPLIT_TEXT)
    # single ints are accepted too
    det = IncrementalDetokenizer(tok)
    assert "".join(det.add(i) for i in ids) + det.finish() == SPLIT_TEXT


@pytest.mark.parametrize("groups", [[2], [3], [5], [1, 4, 2], [100]])
def test_groups_reproduce_one_shot_decode(tok, groups):
    ids = tok.encode(SPLIT_TEXT + "<|im_end|>" + SPLIT_TEXT)
    for skip in (True, False):
        pieces, _ = _stream(tok, ids, groups, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any(REPLACEMENT in p for p in pieces)


FRAGMENTS = st.sampled_from(["🦜", "𝔘", "👨‍👩‍👧", "漢字", "é", "\n", " ", "the", "<|im_start|>", "<think>", "</s>",
                             "\u0301", "🇫🇷", "12"])
STREAM_TEXT = st.lists(st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                                 blacklist_characters=REPLACEMENT), max_size=12),
                                 FRAGMENTS), max_size=12).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=STREAM_TEXT, groups=st.lists(st.integers(1, 6), min_size=1, max_size=8), skip=st.booleans())
def test_stream_random_text_random_groups(tok, text, groups, skip):
    ids = tok.encode(text)
    pieces, _ = _stream(tok, ids, groups, skip_special_tokens=skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any(REPLACEMENT in p for p in pieces)


def test_invalid_bytes_are_flushed(tok):
    lead = tok.token_to_id("ð")  # the byte 0xF0: starts a 4-byte sequence
    a = tok.encode("a")
    assert lead is not None and len(a) == 1
    det = IncrementalDetokenizer(tok)
    assert det.add([lead]) == ""  # maybe the start of a character: held back
    assert det.finish() == REPLACEMENT  # the stream ended: flushed as U+FFFD, like the one-shot decode
    ids = [lead] + a + [lead] * 40 + a
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)


def test_window_stays_small(tok):
    ids = tok.encode(SPLIT_TEXT) * 60 + [11] * 50 + tok.encode(SPLIT_TEXT)
    det = IncrementalDetokenizer(tok)
    out, longest = [], 0
    for i in ids:
        out.append(det.add(i))
        longest = max(longest, len(det._ids))
    out.append(det.finish())
    assert "".join(out) == tok.decode(ids)
    assert longest <= IncrementalDetokenizer.search_after + 4


def test_empty_add(tok):
    det = IncrementalDetokenizer(tok)
    assert det.add([]) == "" and det.finish() == ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 599), max_size=48), groups=st.lists(st.integers(1, 5), min_size=1, max_size=6),
       skip=st.booleans())
def test_stream_arbitrary_ids_matches_decode(tok, ids, groups, skip):
    # any ids at all, invalid byte sequences included: the pieces still add up to the one-shot decode
    pieces, _ = _stream(tok, ids, groups, skip_special_tokens=skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
