"""`hylm niah`: haystack sizing, needle placement, scoring, resumable grids, and the same scores in process and
over HTTP (hylm's own server)."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from hylm.cli import main
from hylm.eval.haystack import (ADJECTIVES, NOISE_SENTENCES, NOUNS, EssayHaystack, FileHaystack, NoiseHaystack,
                                split_sentences)
from hylm.eval.niah import (HTTPBackend, InProcessBackend, Needle, build_prompt, depth_grid, format_table,
                            make_needles, parse_depths, parse_lengths, place_needles, render_messages, run_grid,
                            score, split_reasoning, summarize)


# ---- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmt(tmp_path_factory):
    from chat_fixtures import build_test_tokenizer

    from hylm.chat.chat_format import ChatFormat

    d = tmp_path_factory.mktemp("niah-tok")
    build_test_tokenizer(d)
    return ChatFormat.from_dir(d)


@pytest.fixture(scope="module")
def count(fmt):
    def count_tokens(messages):
        return len(fmt.prompt(messages, enable_thinking=False).ids)
    return count_tokens


class FakeBackend:
    """Counts calls; answers with the first 7-digit number after "magic number for {asked key} is:" (so some
    cases score 1 and multikey distractors can fool it); raises after `fail_after` answers."""

    model_id = "fake"
    settings = {"thinking": False}
    answer_tokens = 16

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def count_tokens(self, x):
        text = x if isinstance(x, str) else "".join(m["content"] for m in x)
        return len(text) // 4 + 8

    def answer(self, messages):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        text = messages[0]["content"]
        found = re.findall(r"\b\d{7}\b", text)
        return (f"It is {found[len(text) % len(found)]}." if found else "no idea"), ""


# ---- sizing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("haystack", ["noise", "essay"])
@pytest.mark.parametrize("variant", ["single", "multikey", "multivalue", "multiquery"])
def test_sizing_fits_target_and_is_maximal(fmt, count, haystack, variant):
    hay = NoiseHaystack() if haystack == "noise" else EssayHaystack("3:0")
    sentence_tokens = max(len(fmt.tokenizer.encode(u)) for u in hay.units(400))  # this tokenizer: ~14 / ~80
    prev = None
    for length in (700, 1200, 2500):
        case = build_prompt(length, 40, variant, 3, count, haystack=haystack, answer_tokens=32)
        assert case.prompt_tokens == count(case.messages)
        assert case.prompt_tokens + 32 <= length
        assert length - (case.prompt_tokens + 32) < sentence_tokens  # short of the target by less than a sentence
        # one more haystack sentence would not fit: the search found the largest count
        more = place_needles(hay.units(case.sentences + 1), case.needles).rstrip()
        assert count(render_messages(more, case.question, "numbers")) + 32 > length
        if prev is not None:
            assert case.sentences > prev.sentences and case.prompt_tokens > prev.prompt_tokens
        prev = case


def test_sizing_counts_with_the_given_counter_and_rejects_too_short_targets(count):
    case = build_prompt(900, 50, "single", 0, count, answer_tokens=100)
    assert case.prompt_tokens + 100 <= 900
    with pytest.raises(ValueError, match="without haystack"):
        build_prompt(60, 50, "single", 0, count)
    calls = []

    def counter(messages):
        calls.append(1)
        return count(messages)

    build_prompt(20000, 50, "single", 0, counter, haystack="essay")
    assert len(calls) <= 14  # interpolation + bisection, not a linear scan


# ---- placement -------------------------------------------------------------------------------------------------

def _needle(depth: float) -> Needle:
    return Needle("shiny-walrus", "1234567", "One of the special magic numbers for shiny-walrus is: 1234567.", depth)


@pytest.mark.parametrize("hay", [NoiseHaystack(), EssayHaystack(7)], ids=["noise", "essay"])
def test_needle_moves_back_to_the_sentence_end_before_the_requested_depth(hay):
    units = hay.units(60)
    haystack = "".join(units)
    total = len(haystack)
    starts = [0]
    for u in units:
        starts.append(starts[-1] + len(u))
    for depth in [0, 1, 5, 12.5, 25, 33, 50, 66.6, 75, 90, 99, 100]:
        nd = _needle(depth)
        text = place_needles(units, [nd])
        p = depth / 100 * total
        # inserted at a sentence boundary, the last one at or before p (so within the sentence holding p)
        assert nd.haystack_offset in starts
        assert nd.haystack_offset <= p
        i = starts.index(nd.haystack_offset)
        assert i == len(units) or p < starts[i + 1]
        assert abs(nd.actual_depth - depth) <= 100 * max(map(len, units)) / total
        # the text is the haystack with the needle sentence inserted, after a sentence end
        assert text[nd.offset:].startswith(nd.text)
        assert text[:nd.offset] + text[nd.offset + len(nd.text) + 1:] == haystack
        before = text[:nd.offset]
        assert before == "" or (before[-1].isspace() and before.rstrip()[-1] in ".!?")
    first, last = _needle(0), _needle(100)
    assert place_needles(units, [first]).startswith(first.text) and first.offset == 0
    assert place_needles(units, [last]).endswith(last.text + " ") and last.actual_depth == 100.0


def test_prompt_holds_every_needle_once_at_sentence_starts(count):
    for variant in ("single", "multikey", "multivalue", "multiquery"):
        case = build_prompt(1500, 50, variant, 1, count, haystack="essay", num_needles=3)
        content = case.messages[0]["content"]
        assert content.endswith(case.question)
        for nd in case.needles:
            assert content.count(nd.text) == 1
            before = case.context[:nd.offset]
            assert before == "" or before.rstrip()[-1] in ".!?"
        assert case.needles[0].depth == 50.0 and abs(case.needles[0].actual_depth - 50) < 10


def test_variants_follow_ruler():
    needles, expected, question = make_needles("single", "numbers", 0, 0, 50)
    assert len(needles) == 1 and expected == [needles[0].value] and needles[0].key in question
    needles, expected, question = make_needles("multikey", "numbers", 0, 0, 50, num_needles=4)
    assert len({n.key for n in needles}) == 4 and expected == [needles[0].value]
    assert needles[0].key in question and not any(n.key in question for n in needles[1:])
    needles, expected, question = make_needles("multivalue", "uuids", 0, 0, 50, num_needles=3)
    assert len({n.key for n in needles}) == 1 and sorted(expected) == sorted(n.value for n in needles)
    assert len(set(expected)) == 3 and "all" in question
    needles, expected, question = make_needles("multiquery", "words", 0, 0, 50, num_needles=3)
    assert all(n.key in question for n in needles) and expected == [n.value for n in needles]
    assert needles[0].text == f"One of the special magic words for {needles[0].key} is: {needles[0].value}."
    with pytest.raises(ValueError):
        make_needles("multikey", "numbers", 0, 0, 50, num_needles=1)
    with pytest.raises(ValueError):
        make_needles("nope", "numbers", 0, 0, 50)


def test_value_formats():
    for s in range(20):
        (n,), _, _ = make_needles("single", "numbers", s, 0, 0)
        assert re.fullmatch(r"[1-9]\d{6}", n.value)
        adj, noun = n.key.split("-")
        assert adj in ADJECTIVES and noun in NOUNS
        (n,), _, _ = make_needles("single", "uuids", s, 0, 0)
        assert uuid.UUID(n.value).version == 4 and str(uuid.UUID(n.value)) == n.value
        (n,), _, _ = make_needles("single", "words", s, 0, 0)
        assert n.value.split("-")[0] in ADJECTIVES and n.value != n.key


def test_seeded_and_deterministic(count):
    a = build_prompt(800, 30, "multikey", 5, count, haystack="essay", sample=2)
    b = build_prompt(800, 30, "multikey", 5, count, haystack="essay", sample=2)
    assert a.messages == b.messages and a.expected == b.expected and a.prompt_tokens == b.prompt_tokens
    c = build_prompt(800, 30, "multikey", 6, count, haystack="essay", sample=2)
    d = build_prompt(800, 30, "multikey", 5, count, haystack="essay", sample=3)
    assert c.messages != a.messages and d.messages != a.messages and c.expected != a.expected
    # a sample hides the same needles at every depth (only the position changes)
    e = build_prompt(800, 80, "multikey", 5, count, haystack="essay", sample=2)
    assert e.expected == a.expected and e.messages != a.messages


def test_haystack_sources(tmp_path):
    assert "".join(NoiseHaystack().units(5)).strip() == " ".join(NOISE_SENTENCES)
    assert EssayHaystack(1).units(30) == EssayHaystack(1).units(40)[:30] != EssayHaystack(2).units(30)
    assert all(u[-1].isspace() and u.rstrip()[-1] in ".!?" for u in EssayHaystack(1).units(200))
    f = tmp_path / "hay.txt"
    f.write_text('First one. "A quoted one!" A number 3.14 stays whole? Last line without end', encoding="utf-8")
    assert split_sentences(f.read_text()) == ["First one. ", '"A quoted one!" ', "A number 3.14 stays whole? ",
                                              "Last line without end "]
    hay = FileHaystack(f)
    assert hay.units(6) == hay.sentences + hay.sentences[:2]  # repeated when more is needed
    with pytest.raises(ValueError):
        FileHaystack(tmp_path / "missing.txt")


# ---- scoring ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,expected,want", [
    ("The special magic number is 1234567.", ["1234567"], 1.0),
    ("1234567", ["1234567"], 1.0),
    ("It is 7654321.", ["1234567"], 0.0),
    ("", ["1234567"], 0.0),
    (None, ["1234567"], 0.0),
    ("A1B2C3D4-0000-4000-8000-000000000001", ["a1b2c3d4-0000-4000-8000-000000000001"], 1.0),
    ("Shiny-Walrus and gentle-otter", ["shiny-walrus", "GENTLE-OTTER"], 1.0),
    ("1111111, 2222222 and 3333333", ["1111111", "2222222", "3333333", "4444444"], 0.75),
    ("only 2222222", ["1111111", "2222222"], 0.5),
])
def test_score(answer, expected, want):
    assert score(answer, expected) == want


def test_scoring_uses_the_answer_after_the_reasoning():
    assert split_reasoning("answer 1234567", "thinking about 7654321") == ("answer 1234567", "thinking about 7654321")
    content, reasoning = split_reasoning("<think>maybe 7654321</think>\nIt is 1234567.", None)
    assert content == "\nIt is 1234567." and reasoning == "maybe 7654321"
    assert score(split_reasoning("maybe 7654321</think>It is 1111111", "")[0], ["7654321"]) == 0.0
    assert split_reasoning(None, None) == ("", "")


# ---- grid, resumption, output -----------------------------------------------------------------------------------

GRID = dict(lengths=[600, 1200], depths=[0, 50, 100], variants=["single", "multikey"], samples_per_cell=2)


def test_resume_runs_only_the_missing_cases(tmp_path):
    total = 2 * 3 * 2 * 2
    full = tmp_path / "full.json"
    fb = FakeBackend()
    doc = run_grid(fb, **GRID, seed=4, cache_path=str(full), progress=False)
    assert fb.calls == total and len(doc["results"]) == total
    assert 0 < doc["summary"]["overall"] <= 1  # the fake finds some needles

    part = tmp_path / "part.json"
    with pytest.raises(RuntimeError):
        run_grid(FakeBackend(fail_after=5), **GRID, seed=4, cache_path=str(part), progress=False)
    saved = json.loads(part.read_text())
    assert len(saved["results"]) == 5
    again = FakeBackend()
    run_grid(again, **GRID, seed=4, cache_path=str(part), progress=False)
    assert again.calls == total - 5
    assert json.loads(part.read_text()) == json.loads(full.read_text())
    done = FakeBackend()
    run_grid(done, **GRID, seed=4, cache_path=str(part), progress=False)
    assert done.calls == 0
    # a larger grid reuses the cases it shares
    more = FakeBackend()
    bigger = dict(GRID, samples_per_cell=3)
    doc = run_grid(more, **bigger, seed=4, cache_path=str(part), progress=False)
    assert more.calls == 2 * 3 * 2 and doc["summary"]["cases"] == 2 * 3 * 2 * 3
    # other settings: refused rather than mixed
    with pytest.raises(ValueError, match="other settings"):
        run_grid(FakeBackend(), **GRID, seed=5, cache_path=str(part), progress=False)


def test_summary_table_and_heatmap(tmp_path):
    results = {}
    for L in (1024, 2048):
        for d in (0.0, 100.0):
            for s in range(2):
                results[f"{L}/{d:g}/single/{s}"] = {"length": L, "depth": d, "variant": "single", "sample": s,
                                                    "score": 1.0 if (L == 1024 or s == 0) else 0.0}
    summary = summarize(results, [1024, 2048], [0.0, 100.0], ["single"], 2)
    assert summary["scores"] == [[1.0, 1.0], [0.5, 0.5]] and summary["by_length"] == [1.0, 0.5]
    assert summary["overall"] == 0.75
    table = format_table(summary)
    assert "1K" in table and "2K" in table and "100.0" in table and "50.0" in table and "75.0" in table
    pytest.importorskip("matplotlib")
    from hylm.eval.niah_plot import plot_heatmap

    png = tmp_path / "h.png"
    assert plot_heatmap(summary, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_axes():
    assert parse_lengths("1k,2K, 4096,1k") == [1024, 2048, 4096]
    assert parse_lengths("128k,1m") == [131072, 1048576]
    for bad in ("1x", "", "0", "1.5"):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    assert parse_depths("0,25%,50,100") == [0.0, 25.0, 50.0, 100.0]
    with pytest.raises(ValueError):
        parse_depths("0,120")
    assert depth_grid(5) == [0.0, 25.0, 50.0, 75.0, 100.0]
    sig = depth_grid(5, "sigmoid")
    assert sig[0] == 0.0 and sig[2] == 50.0 and sig[-1] == 100.0 and 0 < sig[1] < 25 and sig[1] == 100 - sig[3]
    with pytest.raises(ValueError):
        depth_grid(5, "cubic")


# ---- against the engine: in process, over HTTP, and the CLI ---------------------------------------------------------

def test_http_gives_the_same_answers_and_scores_as_in_process(tmp_path, capsys):
    from server_fixtures import ServerThread, chat_checkpoint

    ckpt = chat_checkpoint()
    grid = dict(lengths=[320, 480], depths=[0, 100], variants=["single"], samples_per_cell=1, seed=0,
                haystack="noise")
    local = run_grid(InProcessBackend(str(ckpt), max_model_len=1024, max_tokens=16), **grid, progress=False)
    think = dict(thinking=True, reasoning_budget=2, max_tokens=80, answer_tokens=8)  # the budget ends the reasoning
    local_think = run_grid(InProcessBackend(str(ckpt), max_model_len=1024, **think), [400], [50], progress=False)

    server = ServerThread(ckpt, api_key="secret")
    try:
        with pytest.raises(ValueError, match="401"):
            HTTPBackend(server.url, api_key="wrong")
        remote = run_grid(HTTPBackend(server.url + "/v1", api_key="secret", max_tokens=16), **grid, progress=False)
        remote_think = run_grid(HTTPBackend(server.url, api_key="secret", **think), [400], [50], progress=False)
        # the CLI against the server: table, JSON and (when matplotlib is there) the heatmap
        out = tmp_path / "r.json"
        rc = main(["niah", "--url", server.url, "--api-key", "secret", "--lengths", "320,480", "--depths", "0,100",
                   "--samples", "1", "--haystack", "noise", "--max-answer-tokens", "16", "--out", str(out),
                   "--no-progress"])
    finally:
        server.stop()
    assert len(local["results"]) == 4
    assert local["results"] == remote["results"]  # same prompts, token counts, answers and scores
    assert local_think["results"] == remote_think["results"]
    (rec,) = local_think["results"].values()
    assert rec["reasoning"] and rec["answer"]  # reasoning split off, the answer after it scored
    assert rc == 0
    assert json.loads(out.read_text())["results"] == local["results"]
    printed = capsys.readouterr()
    assert "depth \\ length" in printed.out and "results:" in printed.out


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = [
        ["--url", "localhost:8000"],
        ["--url", "http://127.0.0.1:9"],  # nothing listens on the discard port
        ["--url", "http://127.0.0.1:9", "--lengths", "1x"],
        ["--model", str(tmp_path / "missing")],
        ["--url", "http://127.0.0.1:9", "--depths", "0,50", "--depth-count", "3"],
        ["--url", "http://127.0.0.1:9", "--variant", "single,bogus"],
    ]
    for extra in cases:
        rc = main(["niah", *extra, "--out", str(tmp_path / "x.json"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, extra
        assert err.startswith("hylm: error: ") and "\n" not in err, (extra, err)
