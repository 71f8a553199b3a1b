"""Tool-call parser (hylm.chat.tool_calls): typed conversion, malformed input, streaming at every split,
and property tests (fragment soups; random well-formed calls rendered and parsed back)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hylm.chat.tool_calls import (
    ContentDelta,
    ToolCall,
    ToolCallArgumentsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    convert_value,
    parse_tool_calls,
)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
        }, "required": ["city"]},
    }},
    {"type": "function", "function": {
        "name": "calc",
        "parameters": {"type": "object", "properties": {
            "x": {"type": "number"},
            "y": {"type": "number"},
            "opts": {"type": "object"},
            "items": {"type": "array"},
            "note": {"type": ["string", "null"]},
            "maybe": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "code": {"type": "string"},
            "free": {},
        }},
    }},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>\n"


def one(text: str, tools=TOOLS):
    content, calls = parse_tool_calls(text, tools)
    return content, [(c.name, c.arguments) for c in calls]


def stream(text: str, cuts: list[int], tools=TOOLS):
    """Feed ``text`` cut at ``cuts``; check event well-formedness; return (content, [(name, args_json)])."""
    parser = ToolCallStreamParser(tools)
    events = []
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    content, calls = [], []
    for e in events:
        if isinstance(e, ContentDelta):
            assert e.text
            content.append(e.text)
        elif isinstance(e, ToolCallStart):
            assert e.index == len(calls)
            assert e.id.startswith("call_") and e.name
            calls.append([e.name, ""])
        else:
            assert isinstance(e, ToolCallArgumentsDelta)
            assert e.index == len(calls) - 1 and e.text
            calls[e.index][1] += e.text
    for (name, args_json), c in zip(calls, parser.calls):
        assert isinstance(json.loads(args_json), dict)  # every call's arguments are closed
        assert (name, args_json) == (c.name, c.arguments_json)
    assert len(calls) == len(parser.calls)
    return "".join(content), [(n, a) for n, a in calls]


def one_as_stream(text: str, tools=TOOLS):
    content, calls = parse_tool_calls(text, tools)
    return content, [(c.name, c.arguments_json) for c in calls]


# ------------------------------------------------------------------------------- hand-written cases

def test_single_call_typed():
    text = call("get_weather", city="Paris", days="3", metric="TRUE")
    assert one(text) == ("", [("get_weather", {"city": "Paris", "days": 3, "metric": True})])


def test_tool_call_dataclass():
    content, calls = parse_tool_calls(call("get_weather", city="Oslo"), TOOLS)
    (c,) = calls
    assert isinstance(c, ToolCall)
    assert c.id.startswith("call_") and len(c.id) == len("call_") + 8
    int(c.id[5:], 16)
    assert c.arguments_json == '{"city": "Oslo"}'
    ids = iter(["id-a", "id-b"])
    _, calls = parse_tool_calls(call("ping") + call("ping"), TOOLS, id_factory=lambda: next(ids))
    assert [c.id for c in calls] == ["id-a", "id-b"]


def test_number_conversions():
    text = call("calc", x="1.5", y="-2")
    assert one(text)[1] == [("calc", {"x": 1.5, "y": -2})]
    assert isinstance(one(text)[1][0][1]["y"], int)
    assert one(call("calc", x="1e3", y="abc"))[1] == [("calc", {"x": 1000.0, "y": "abc"})]
    assert one(call("calc", x="nan", y="inf"))[1] == [("calc", {"x": "nan", "y": "inf"})]


def test_object_array_conversions():
    text = call("calc", opts='{"a": [1, 2], "b": {"c": null}}', items="[1, \"two\", 3.5]")
    assert one(text)[1] == [("calc", {"opts": {"a": [1, 2], "b": {"c": None}}, "items": [1, "two", 3.5]})]
    # invalid JSON falls back to the raw string; NaN is not JSON
    assert one(call("calc", opts="{a: 1}", items="[NaN]"))[1] == [("calc", {"opts": "{a: 1}", "items": "[NaN]"})]
    assert one(call("calc", opts="[1]"))[1] == [("calc", {"opts": "[1]"})]  # wrong JSON kind


def test_string_stays_string():
    text = call("get_weather", city="007")
    assert one(text)[1] == [("get_weather", {"city": "007"})]
    assert one(call("get_weather", city="true"))[1] == [("get_weather", {"city": "true"})]
    assert one(call("get_weather", city='{"a": 1}'))[1] == [("get_weather", {"city": '{"a": 1}'})]


def test_multiline_string_exactly_one_newline_stripped():
    code = "def f():\n    return 1\n"
    text = f"<tool_call>\n<function=calc>\n<parameter=code>\n{code}\n</parameter>\n</function>\n</tool_call>"
    assert one(text)[1] == [("calc", {"code": code})]
    text = "<tool_call>\n<function=calc>\n<parameter=code>\n\n  x\n\n</parameter>\n</function>\n</tool_call>"
    assert one(text)[1] == [("calc", {"code": "\n  x\n"})]
    text = "<tool_call><function=calc><parameter=code>inline</parameter></function></tool_call>"
    assert one(text)[1] == [("calc", {"code": "inline"})]


def test_unions():
    assert one(call("calc", note="null"))[1] == [("calc", {"note": None})]
    assert one(call("calc", note="hello"))[1] == [("calc", {"note": "hello"})]
    assert one(call("calc", maybe="12"))[1] == [("calc", {"maybe": 12})]
    assert one(call("calc", maybe="twelve"))[1] == [("calc", {"maybe": "twelve"})]


def test_unknown_param_and_no_schema():
    assert one(call("calc", free="[1, 2]", extra="42", other="plain text"))[1] == [
        ("calc", {"free": [1, 2], "extra": 42, "other": "plain text"})]
    # no tools: any name, generic conversion
    assert one(call("anything", a="1", b="x", c='{"k": true}'), tools=None)[1] == [
        ("anything", {"a": 1, "b": "x", "c": {"k": True}})]
    assert one(call("anything"), tools=[])[1] == [("anything", {})]


def test_convert_value_direct():
    assert convert_value("5.0", {"type": "integer"}) == 5
    assert convert_value(" 7 ", {"type": "integer"}) == 7
    assert convert_value("False", {"type": "boolean"}) is False
    assert convert_value("yes", {"type": "boolean"}) == "yes"
    assert convert_value("None", {"type": "null"}) is None
    assert convert_value("1", {"enum": ["1", "2"]}) == "1"
    assert convert_value("1", {"type": "weird"}) == 1
    assert convert_value("x" * 10, None) == "x" * 10
    assert convert_value("9" * 5000, {"type": "integer"}) == "9" * 5000  # int digit limit: raw string
    assert convert_value("[" * 100000, {"type": "array"}) == "[" * 100000  # recursion: raw string


def test_multiple_calls_and_content():
    text = ("Let me check both.\n\n" + call("get_weather", city="Paris") + call("calc", x="2", y="3")
            + "\nDone.\n")
    content, calls = one(text)
    assert content == "Let me check both.\nDone."
    assert calls == [("get_weather", {"city": "Paris"}), ("calc", {"x": 2, "y": 3})]
    # segments between calls are trimmed and joined with one newline
    text = "A\n\n" + call("ping") + "\n  B  C\n\n" + call("ping") + "\n\n" + call("ping") + " D "
    assert one(text) == ("A\nB  C\nD", [("ping", {})] * 3)
    text = "<tool_call>x\n\n" + call("ping") + "<tool_call>"  # malformed text is content
    assert one(text) == ("<tool_call>x\n<tool_call>", [("ping", {})])


def test_no_calls():
    assert one("  just an answer\n") == ("just an answer", [])
    assert one("") == ("", [])
    assert one("a < b and <tool_ stuff") == ("a < b and <tool_ stuff", [])


def test_call_without_parameters_and_duplicates():
    assert one(call("ping")) == ("", [("ping", {})])
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n<parameter=city>\nB\n</parameter>\n</function>\n</tool_call>"
    assert one(text)[1] == [("get_weather", {"city": "A"})]  # first value wins


MALFORMED_AS_TEXT = [
    "<tool_call>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",  # no <function=
    "<tool_call>\nhello world\n</tool_call>",  # garbage
    "<tool_call>\n<function=unknown_fn>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=get\nweather>\n</function>\n</tool_call>",  # newline in name
    "<tool_call>\n<function=>\n</function>\n</tool_call>",  # empty name
    "<tool_call>\n<function=get_wea",  # unterminated before the header completes
    "<tool_call>",
    "<tool_call",
    "</tool_call>",
    "<function=get_weather>\n</function>",  # no <tool_call>
]


@pytest.mark.parametrize("text", MALFORMED_AS_TEXT)
def test_malformed_stays_text(text):
    assert one(text) == (text.strip(), [])


def test_malformed_then_valid():
    text = "<tool_call>\njunk\n" + call("ping")
    assert one(text) == ("<tool_call>\njunk", [("ping", {})])


def test_lenient_after_header():
    # missing </function>: </tool_call> ends the call
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>\nok"
    assert one(text) == ("ok", [("get_weather", {"city": "Paris"})])
    # missing </tool_call>: what follows </function> is content
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\nok"
    assert one(text) == ("ok", [("get_weather", {"city": "Paris"})])
    # missing </parameter>
    text = "<tool_call>\n<function=get_weather>\n<parameter=days>\n4\n</function>\n</tool_call>"
    assert one(text) == ("", [("get_weather", {"days": 4})])
    # garbage inside a committed call is ignored
    text = "<tool_call>\n<function=get_weather>\nhmm\n<parameter=city>\nRome\n</parameter>\nzz</function>\n</tool_call>"
    assert one(text) == ("", [("get_weather", {"city": "Rome"})])
    # truncated inside a committed call: completed parameters kept, the open one dropped
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n3"
    assert one(text) == ("", [("get_weather", {"city": "Rome"})])
    assert one("<tool_call>\n<function=ping>") == ("", [("ping", {})])


def test_weird_tools_never_raise():
    for tools in ([None, 3, "x", {"function": "x"}, {"function": {"name": 5}}],
                  [{"name": "bare", "parameters": {"properties": {"n": {"type": "integer"}}}}],
                  "notalist", 42):
        parse_tool_calls(call("bare", n="1"), tools)
    assert one(call("bare", n="1"), tools=[{"name": "bare", "parameters": {
        "properties": {"n": {"type": "integer"}}}}])[1] == [("bare", {"n": 1})]


def test_stream_events_shape():
    parser = ToolCallStreamParser(TOOLS)
    text = "Hi " + call("get_weather", city="Paris", days="2")
    events = []
    for ch in text:
        events += parser.feed(ch)
    events += parser.finish()
    kinds = [type(e).__name__ for e in events]
    assert kinds[-4:] == ["ToolCallStart", "ToolCallArgumentsDelta", "ToolCallArgumentsDelta",
                          "ToolCallArgumentsDelta"]
    args = [e.text for e in events if isinstance(e, ToolCallArgumentsDelta)]
    assert args == ['{"city": "Paris"', ', "days": 2', "}"]
    # the start is emitted as soon as the name is complete
    p = ToolCallStreamParser(TOOLS)
    assert p.feed("<tool_call>\n<function=get_weath") == []
    (start,) = p.feed("er>")
    assert isinstance(start, ToolCallStart) and start.name == "get_weather" and start.index == 0
    # partial tag held back from content
    p = ToolCallStreamParser(TOOLS)
    assert p.feed("Hello <tool_") == [ContentDelta("Hello")]
    assert p.feed("x") == [ContentDelta(" <tool_x")]


STREAM_TEXTS = [
    "Let me check.\n" + call("get_weather", city="Paris\nFrance", days="3") + call("calc", opts='{"a": 1}'),
    "A\n" + call("ping") + "B",
    "<tool_call>\njunk\n" + call("ping") + "tail",
    *MALFORMED_AS_TEXT,
    "<tool_call>\n<function=get_weather>\n<parameter=days>\n4\n</function>\n</tool_call>x",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n3",
    "<tool_call><function=calc><parameter=code></parameter></parameter></function></tool_call>",
    "<tool_call>\n<function=calc>\n<parameter=\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>\n</tool_",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_every_split(text):
    expected = one_as_stream(text)
    assert stream(text, []) == expected
    for i in range(len(text) + 1):
        assert stream(text, [i]) == expected, i
    assert stream(text, list(range(1, len(text)))) == expected


# ------------------------------------------------------------------------------------- properties

SOUP = ["<tool_call>", "</tool_call>", "<function=get_weather>", "<function=calc>", "<function=nope>",
        "<function=", "</function>", "<parameter=city>", "<parameter=days>", "<parameter=x>",
        "<parameter=opts>", "<parameter=", "</parameter>", ">", "<", "</", "\n", " ", "Paris", "42", "1.5",
        '{"a": 1}', "[1,", "true", "</tool_", "<tool_", "<param", "</para", "x", "é", "🙂"]
soups = st.lists(st.sampled_from(SOUP), max_size=30).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=soups, data=st.data())
def test_property_soup_stream_equals_one_piece(text, data):
    expected = one_as_stream(text)  # never raises
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert stream(text, cuts) == expected
    assert stream(text, list(range(1, len(text)))) == expected


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60), tools=st.sampled_from([None, TOOLS]))
def test_property_arbitrary_text_never_raises(text, tools):
    expected = one_as_stream(text, tools)
    assert stream(text, list(range(1, len(text))), tools) == expected


# random well-formed calls: the generator is the reference
safe_text = st.text(st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=15)
typed_params = {
    "city": safe_text,
    "days": st.integers(-10**6, 10**6),
    "metric": st.booleans(),
    "x": st.floats(allow_nan=False, allow_infinity=False, width=32),
    "opts": st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    "items": st.lists(st.integers() | st.booleans() | st.none(), max_size=4),
    "code": safe_text,
}
PARAM_FN = {"city": "get_weather", "days": "get_weather", "metric": "get_weather",
            "x": "calc", "opts": "calc", "items": "calc", "code": "calc"}


def render_value(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


@st.composite
def well_formed(draw):
    calls, parts = [], []
    prefix = draw(safe_text)
    for _ in range(draw(st.integers(0, 3))):
        fn = draw(st.sampled_from(["get_weather", "calc"]))
        names = draw(st.lists(st.sampled_from([p for p, f in PARAM_FN.items() if f == fn]), unique=True))
        args = {n: draw(typed_params[n]) for n in names}
        calls.append((fn, args))
        parts.append(call(fn, **{n: render_value(v) for n, v in args.items()}))
    return prefix + "".join(parts), prefix.strip(), calls


@settings(max_examples=200, deadline=None)
@given(case=well_formed(), data=st.data())
def test_property_well_formed_roundtrip(case, data):
    text, content, calls = case
    assert one(text) == (content, calls)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert stream(text, cuts) == (content, [(n, json.dumps(a, ensure_ascii=False)) for n, a in calls])
