"""Parse the tool calls Nemotron 3 writes (the ``qwen3_coder`` XML-ish format) out of content text.

Format::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    ...
    </function>
    </tool_call>

``parse_tool_calls`` (whole text) and ``ToolCallStreamParser`` (deltas) implement the same rules; for
any split of the text into deltas the streamed content, call names and argument JSON equal the
one-piece result. Nothing here raises on any input text or on malformed ``tools``.

Rules
-----
* *Header.* A call starts at ``<tool_call>``, optional whitespace, ``<function=NAME>``. NAME is the text
  up to ``>``, stripped; it must be non-empty, contain no ``<`` or newline, and -- when ``tools`` is
  non-empty -- be one of the declared function names. If the header is anything else (no
  ``<function=``, garbage, unknown name, or the text ends before the header is complete), the
  ``<tool_call>`` is **left as content text** and scanning resumes right after it (a well-formed call
  nested in the garbage is still found).
* *Commit.* Once the header is complete the call is committed: ``ToolCallStreamParser`` emits
  ``ToolCallStart`` right then, so the one-piece parse treats what follows leniently too (it could not
  be taken back when streaming):

  - ``<parameter=ARG>VALUE</parameter>`` elements give the arguments. ARG is stripped; a parameter
    opener whose name contains ``<`` or a newline, or is empty, is ignored. VALUE is everything up to
    the first ``</parameter>`` -- or ``</function>`` / ``</tool_call>`` if that comes first (a missing
    ``</parameter>`` is tolerated); exactly one leading and one trailing ``\\n`` are removed.
  - The call ends at ``</function>`` (then optional whitespace and ``</tool_call>`` are consumed; if
    something else follows, it is content) or at ``</tool_call>`` (a missing ``</function>`` is
    tolerated).
  - Text inside a committed call outside parameter elements is ignored (dropped).
  - If the text ends inside a committed call (``max_tokens``), the call is kept with the parameters
    completed so far; a parameter whose value is still open is dropped.
  - A repeated parameter name keeps its first value (later ones are dropped) so the streamed JSON text
    can equal ``json.dumps`` of the arguments dict.
* *Values* are converted by the parameter's JSON-schema type (``convert_value``): ``string`` -> as is;
  ``integer`` -> int (``"5.0"`` -> 5); ``number`` -> int or float; ``boolean`` -> ``true``/``false``
  (any case); ``null`` -> ``null``/``none`` (any case); ``object`` / ``array`` -> JSON of that kind.
  Unions (``"type": [...]``, ``anyOf``, ``oneOf``) try null, boolean, integer, number, array, object,
  then string, in that order. A value no declared type accepts stays the raw string. Unknown
  parameters, untyped schemas or no tools: JSON if the value parses as JSON, else the raw string
  (an untyped ``enum`` containing the raw string keeps it a string). NaN/Infinity are never produced
  (they are not JSON).
* *Content* is the text outside committed calls: each segment (before the first call, between two
  calls, after the last) is stripped of leading and trailing whitespace, and the non-empty segments
  are joined with one ``\n``. Text of a malformed ``<tool_call>`` is ordinary content, not a boundary.
* *Ids* are ``call_`` + 8 random hex digits (``secrets``), unless an ``id_factory`` is given.
* With ``tools`` ``None`` or empty, any function name is accepted.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Union

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"

__all__ = [
    "ContentDelta",
    "Event",
    "ToolCall",
    "ToolCallArgumentsDelta",
    "ToolCallStart",
    "ToolCallStreamParser",
    "convert_value",
    "new_call_id",
    "parse_tool_calls",
]


def new_call_id() -> str:
    """``call_`` + 8 random hex digits."""
    return "call_" + secrets.token_hex(4)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict = field(default_factory=dict)

    @property
    def arguments_json(self) -> str:
        return _dumps(self.arguments)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    index: int
    text: str


Event = Union[ContentDelta, ToolCallStart, ToolCallArgumentsDelta]


# ----------------------------------------------------------------------------------------- values

_INT_RE = re.compile(r"[+-]?\d+")
_NUM_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TYPE_ORDER = ("null", "boolean", "integer", "number", "array", "object")
_MISSING = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def _json_value(raw: str) -> Any:
    """``json.loads`` without NaN/Infinity, and only if the result can be dumped again; else _MISSING."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
        _dumps(value)
    except Exception:  # ValueError, RecursionError, digit limits, ...
        return _MISSING
    return value


def _as_int(s: str) -> Any:
    s = s.strip()
    try:
        if _INT_RE.fullmatch(s):
            return int(s)
        if _NUM_RE.fullmatch(s):
            f = float(s)
            if math.isfinite(f) and f.is_integer():
                return int(f)
    except (ValueError, OverflowError):
        pass
    return _MISSING


def _as_number(s: str) -> Any:
    v = _as_int(s) if _INT_RE.fullmatch(s.strip()) else _MISSING
    if v is not _MISSING:
        return v
    s = s.strip()
    if _NUM_RE.fullmatch(s):
        try:
            f = float(s)
        except (ValueError, OverflowError):
            return _MISSING
        if math.isfinite(f):
            return f
    return _MISSING


def _convert_as(raw: str, type_name: str) -> Any:
    if type_name == "null":
        return None if raw.strip().lower() in ("null", "none") else _MISSING
    if type_name == "boolean":
        low = raw.strip().lower()
        return True if low == "true" else False if low == "false" else _MISSING
    if type_name == "integer":
        return _as_int(raw)
    if type_name == "number":
        return _as_number(raw)
    if type_name in ("object", "array"):
        v = _json_value(raw)
        return v if isinstance(v, dict if type_name == "object" else list) else _MISSING
    return _MISSING


def _schema_types(schema: Any, depth: int = 0) -> set[str] | None:
    """Declared type names of a property schema, or None when it declares none (untyped)."""
    if not isinstance(schema, dict) or depth > 20:
        return None
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        names = {x for x in t if isinstance(x, str)}
        return names or None
    types: set[str] = set()
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        if isinstance(subs, list):
            for sub in subs:
                sub_types = _schema_types(sub, depth + 1)
                types |= {"any"} if sub_types is None else sub_types
    return types or None


def convert_value(raw: str, schema: Any = None) -> Any:
    """Convert one parameter value (text) by its JSON schema; see the module docstring."""
    types = _schema_types(schema)
    if types is None:
        enum = schema.get("enum") if isinstance(schema, dict) else None
        if isinstance(enum, list) and raw in enum:
            return raw
        v = _json_value(raw)
        return raw if v is _MISSING else v
    for type_name in _TYPE_ORDER:
        if type_name in types:
            v = _convert_as(raw, type_name)
            if v is not _MISSING:
                return v
    if "string" in types:
        return raw
    if types - set(_TYPE_ORDER):  # "any" (untyped union member) or an unknown type name
        v = _json_value(raw)
        if v is not _MISSING:
            return v
    return raw


class _Schemas:
    """Function names and parameter schemas from OpenAI-style tool dicts (tolerates junk)."""

    def __init__(self, tools: Any) -> None:
        self.restrict = False
        self.params: dict[str, dict] = {}
        if not isinstance(tools, (list, tuple)) or not tools:
            return
        self.restrict = True
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            fn = tool.get("function", tool)
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            self.params[fn["name"]] = props if isinstance(props, dict) else {}

    def accepts(self, name: str) -> bool:
        return not self.restrict or name in self.params

    def param_schema(self, function: str, param: str) -> Any:
        return self.params.get(function, {}).get(param)


# ----------------------------------------------------------------------------------------- parser

def _partial_suffix(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``markers``."""
    longest = max(len(m) for m in markers) - 1
    for k in range(min(longest, len(buf)), 0, -1):
        tail = buf[-k:]
        if any(len(m) > k and m.startswith(tail) for m in markers):
            return k
    return 0


def _earliest(buf: str, markers: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """Earliest complete marker at or after ``start`` (no marker contains another, so a complete match
    can never be pre-empted by a longer marker starting earlier)."""
    best: tuple[int, str] | None = None
    for m in markers:
        i = buf.find(m, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, m)
    return best


def _skip_ws(buf: str, i: int = 0) -> int:
    while i < len(buf) and buf[i].isspace():
        i += 1
    return i


class _ContentSink:
    """Streams content: each segment of text between committed calls is stripped of leading and
    trailing whitespace, and non-empty segments are joined with one newline."""

    def __init__(self) -> None:
        self._started = False  # some content emitted
        self._segment_start = True
        self._pending_ws = ""

    def boundary(self) -> None:
        """A committed call: the current segment ends."""
        self._segment_start = True
        self._pending_ws = ""

    def add(self, s: str) -> str:
        out = ""
        if self._segment_start:
            s = s.lstrip()
            if not s:
                return ""
            self._segment_start = False
            if self._started:
                out = "\n"
        t = s.rstrip()
        if not t:
            self._pending_ws += s
            return ""
        out += self._pending_ws + t
        self._pending_ws = s[len(t):]
        self._started = True
        return out


_OUTSIDE, _HEADER, _BODY, _PARAM_NAME, _PARAM_VALUE, _AFTER_FUNCTION = range(6)
_BODY_MARKERS = (PARAMETER_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
_VALUE_MARKERS = (PARAMETER_CLOSE, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
_MAX_VALUE_MARKER = max(len(m) for m in _VALUE_MARKERS)


class ToolCallStreamParser:
    """Incremental tool-call parser: ``feed(delta)`` / ``finish()`` -> list of events.

    Events: ``ContentDelta(text)``; ``ToolCallStart(index, id, name)`` as soon as a call's header
    ``<tool_call><function=NAME>`` is complete; ``ToolCallArgumentsDelta(index, text)`` -- for each
    call, the concatenation of its argument deltas is exactly ``json.dumps(arguments)`` (one delta per
    completed parameter, then ``}``; ``{}`` for a call without parameters). Call ``finish()`` once at
    the end: it flushes held-back text and closes a call left open. ``calls`` holds the ``ToolCall``
    objects (arguments filled in as parameters complete)."""

    def __init__(self, tools: list[dict] | None = None, *,
                 id_factory: Callable[[], str] | None = None) -> None:
        self._schemas = _Schemas(tools)
        self._new_id = id_factory or new_call_id
        self._buf = ""
        self._state = _OUTSIDE
        self._search_from = 0
        self._content = _ContentSink()
        self._param = ""
        self._call: ToolCall | None = None
        self.calls: list[ToolCall] = []
        self._finished = False

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        out = self._run(final=True)
        self._finished = True
        return out

    # -- helpers
    def _emit_content(self, out: list[Event], text: str) -> None:
        text = self._content.add(text)
        if not text:
            return
        if out and isinstance(out[-1], ContentDelta):
            out[-1] = ContentDelta(out[-1].text + text)
        else:
            out.append(ContentDelta(text))

    def _add_param(self, out: list[Event], raw: str) -> None:
        call = self._call
        assert call is not None
        if self._param in call.arguments:
            return  # first value wins
        if raw.startswith("\n"):
            raw = raw[1:]
        if raw.endswith("\n"):
            raw = raw[:-1]
        value = convert_value(raw, self._schemas.param_schema(call.name, self._param))
        prefix = ", " if call.arguments else "{"
        call.arguments[self._param] = value
        out.append(ToolCallArgumentsDelta(len(self.calls) - 1,
                                          f"{prefix}{_dumps(self._param)}: {_dumps(value)}"))

    def _end_call(self, out: list[Event]) -> None:
        call = self._call
        assert call is not None
        out.append(ToolCallArgumentsDelta(len(self.calls) - 1, "}" if call.arguments else "{}"))
        self._call = None

    # -- state machine
    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            buf = self._buf
            state = self._state
            if state == _OUTSIDE:
                i = buf.find(TOOL_CALL_OPEN)
                if i >= 0:
                    self._emit_content(out, buf[:i])
                    self._buf = buf[i + len(TOOL_CALL_OPEN):]
                    self._state = _HEADER
                    continue
                keep = 0 if final else _partial_suffix(buf, (TOOL_CALL_OPEN,))
                self._emit_content(out, buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return out

            if state == _HEADER:  # buf: text after "<tool_call>"
                j = _skip_ws(buf)
                rest = buf[j:]
                ok = None  # None: need more text; False: malformed; True: complete
                gt = -1
                if rest.startswith(FUNCTION_OPEN):
                    n0 = j + len(FUNCTION_OPEN)
                    gt = buf.find(">", n0)
                    name_part = buf[n0:] if gt < 0 else buf[n0:gt]
                    if "\n" in name_part or "<" in name_part:
                        ok = False
                    elif gt >= 0:
                        name = name_part.strip()
                        ok = bool(name) and self._schemas.accepts(name)
                elif not FUNCTION_OPEN.startswith(rest):
                    ok = False
                if ok is None and final:
                    ok = False
                if ok is None:
                    return out
                if not ok:  # leave "<tool_call>" as text, rescan what follows it
                    self._emit_content(out, TOOL_CALL_OPEN)
                    self._state = _OUTSIDE
                    continue
                self._content.boundary()
                call = ToolCall(self._new_id(), name, {})
                self.calls.append(call)
                self._call = call
                out.append(ToolCallStart(len(self.calls) - 1, call.id, call.name))
                self._buf = buf[gt + 1:]
                self._state = _BODY
                continue

            if state == _BODY:
                hit = _earliest(buf, _BODY_MARKERS)
                if hit is None:
                    if final:
                        self._buf = ""
                        self._end_call(out)
                        self._state = _OUTSIDE
                        continue
                    keep = _partial_suffix(buf, _BODY_MARKERS)
                    self._buf = buf[len(buf) - keep:]  # the rest is ignored
                    return out
                i, marker = hit
                self._buf = buf[i + len(marker):]
                if marker == PARAMETER_OPEN:
                    self._state = _PARAM_NAME
                else:
                    self._end_call(out)
                    self._state = _AFTER_FUNCTION if marker == FUNCTION_CLOSE else _OUTSIDE
                continue

            if state == _PARAM_NAME:  # buf: text after "<parameter="
                gt = buf.find(">")
                name_part = buf if gt < 0 else buf[:gt]
                if "\n" in name_part or "<" in name_part or (gt >= 0 and not name_part.strip()):
                    self._state = _BODY  # ignore this opener
                    continue
                if gt < 0:
                    if final:
                        self._state = _BODY
                        continue
                    return out
                self._param = name_part.strip()
                self._buf = buf[gt + 1:]
                self._state = _PARAM_VALUE
                self._search_from = 0
                continue

            if state == _PARAM_VALUE:
                hit = _earliest(buf, _VALUE_MARKERS, self._search_from)
                if hit is None:
                    if final:  # value never closed: drop the parameter
                        self._buf = ""
                        self._end_call(out)
                        self._state = _OUTSIDE
                        continue
                    self._search_from = max(0, len(buf) - (_MAX_VALUE_MARKER - 1))
                    return out
                i, marker = hit
                self._add_param(out, buf[:i])
                self._buf = buf[i + len(marker):]
                if marker == PARAMETER_CLOSE:
                    self._state = _BODY
                else:
                    self._end_call(out)
                    self._state = _AFTER_FUNCTION if marker == FUNCTION_CLOSE else _OUTSIDE
                continue

            # _AFTER_FUNCTION: optional whitespace, then "</tool_call>" (tolerated if missing)
            j = _skip_ws(buf)
            rest = buf[j:]
            if rest.startswith(TOOL_CALL_CLOSE):
                self._buf = rest[len(TOOL_CALL_CLOSE):]
            elif TOOL_CALL_CLOSE.startswith(rest) and not final:
                return out
            self._state = _OUTSIDE


def parse_tool_calls(text: str, tools: list[dict] | None = None, *,
                     id_factory: Callable[[], str] | None = None) -> tuple[str, list[ToolCall]]:
    """Parse a complete text: ``(content, calls)``; see the module docstring for the rules."""
    parser = ToolCallStreamParser(tools, id_factory=id_factory)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return content, parser.calls
