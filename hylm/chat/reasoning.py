"""Split Nemotron 3 output text into ``reasoning_content`` and ``content`` (``<think>...</think>``).

Nemotron 3's generation prompt ends with ``<|im_start|>assistant\\n<think>\\n`` when thinking is on
(the default) and with ``<|im_start|>assistant\\n<think></think>`` when it is off. With thinking on the
model's output therefore starts *inside* the reasoning and contains only the closing ``</think>``.
These parsers work on decoded text, not token ids.

Exact rules (``parse_reasoning`` and ``ReasoningStreamParser`` implement the same ones):

1. *Leading open tag.* If the output starts with exactly ``<think>`` (no leading whitespace), that tag
   and one ``\\n`` directly after it are removed and the output is treated as starting inside the
   reasoning -- whatever ``prompt_in_thinking`` says (thinking-off robustness; some templates also let
   the model write the tag itself).
2. *Reasoning.* If the output is inside the reasoning (``prompt_in_thinking=True`` or rule 1 applied),
   the reasoning runs up to the first ``</think>``. That tag, one ``\\n`` directly before it and one
   ``\\n`` directly after it are removed (the template renders ``<think>\\n...\\n</think>\\n``). The
   reasoning text itself is kept verbatim: a stray ``<think>`` inside it stays (there is no nesting; the
   first ``</think>`` always closes). If there is no ``</think>`` (generation stopped inside the
   reasoning, e.g. at ``max_tokens``) everything is reasoning, kept verbatim, and content is ``None``.
3. *Content.* Everything after the closing tag (or the whole output when thinking is off and rule 1
   does not apply) is content, with every ``<think>`` / ``</think>`` removed -- in the real tokenizer
   these are special tokens (ids 12 and 13), never answer text, so no orphan tag reaches content. A
   second ``</think>`` is therefore dropped, and the text around it stays content. Removal is repeated
   until no tag remains (``</th<think>ink>`` -> ``</think>`` -> ``""``), so content never contains a
   tag. Newlines next to these stray tags are kept.
4. Empty reasoning / content are returned as ``None``.

Accounting: the input is exactly ``lead + reasoning + close + raw_content`` where ``lead`` is ``""`` or
``"<think>"`` (+ ``"\\n"``), ``close`` is ``""`` or ``["\\n"] + "</think>" + ["\\n"]``, and ``content`` is
``raw_content`` with tags removed as in rule 3. No other character is added, dropped or duplicated.

Streaming (``ReasoningStreamParser``) gives, for any split of the output into deltas, pieces whose
concatenation per kind equals the one-piece result (``None`` <-> ``""``). It holds back text that could
still turn into a tag (a trailing ``</thi``; a ``\\n`` that could precede ``</think>``; in content a
chain of tag prefixes such as ``</th<thi``) until the next delta or ``finish()`` disambiguates it.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_TAGS = (THINK_OPEN, THINK_CLOSE)

REASONING = "reasoning"
CONTENT = "content"

__all__ = [
    "CONTENT",
    "REASONING",
    "THINK_CLOSE",
    "THINK_OPEN",
    "ReasoningStreamParser",
    "parse_reasoning",
    "strip_think_tags",
]


def _is_proper_tag_prefix(s: str) -> bool:
    return bool(s) and any(len(s) < len(t) and t.startswith(s) for t in _TAGS)


def _chain_start(s: str) -> int:
    """Start of the longest suffix of ``s`` made of proper tag prefixes back to back (``</th<thi``).

    Exactly those characters can still be removed by rule 3 once more text arrives (finishing the last
    prefix removes it, which may let the one before complete, and so on); everything before is final.
    Tag prefixes contain ``<`` only at their start, so the segments are delimited by ``<``."""
    start = end = len(s)
    while True:
        lt = s.rfind("<", 0, end)
        if lt < 0 or not _is_proper_tag_prefix(s[lt:end]):
            return start
        start = end = lt


class _TagStripper:
    """Streaming removal of ``<think>`` / ``</think>`` until none remain (rule 3).

    Uses a stack: push each character, pop a tag as soon as the stack ends with one. The two tags
    neither overlap nor contain each other, so this gives the unique result of repeated removal."""

    def __init__(self) -> None:
        self._hold = ""  # suffix of the stack that may still be removed

    def feed(self, s: str) -> str:
        if not self._hold and "<" not in s:
            return s
        stack = list(self._hold)
        for ch in s:
            stack.append(ch)
            if ch == ">":
                if len(stack) >= 7 and "".join(stack[-7:]) == THINK_OPEN:
                    del stack[-7:]
                elif len(stack) >= 8 and "".join(stack[-8:]) == THINK_CLOSE:
                    del stack[-8:]
        text = "".join(stack)
        cut = _chain_start(text)
        self._hold = text[cut:]
        return text[:cut]

    def finish(self) -> str:
        out, self._hold = self._hold, ""
        return out


def strip_think_tags(text: str) -> str:
    """Remove ``<think>`` and ``</think>`` from ``text`` until none remain."""
    stripper = _TagStripper()
    return stripper.feed(text) + stripper.finish()


def _none_if_empty(s: str) -> str | None:
    return s if s else None


def parse_reasoning(text: str, prompt_in_thinking: bool) -> tuple[str | None, str | None]:
    """Split a complete output into ``(reasoning, content)``; see the module docstring for the rules.

    ``prompt_in_thinking=True``: the prompt ended with ``<think>\\n`` (thinking on).
    ``prompt_in_thinking=False``: it ended with ``<think></think>`` (thinking off)."""
    pos = 0
    in_reasoning = bool(prompt_in_thinking)
    if text.startswith(THINK_OPEN):
        pos = len(THINK_OPEN)
        if text.startswith("\n", pos):
            pos += 1
        in_reasoning = True
    if not in_reasoning:
        return None, _none_if_empty(strip_think_tags(text))
    end = text.find(THINK_CLOSE, pos)
    if end < 0:
        return _none_if_empty(text[pos:]), None
    r_end = end - 1 if end > pos and text[end - 1] == "\n" else end
    c_start = end + len(THINK_CLOSE)
    if text.startswith("\n", c_start):
        c_start += 1
    return _none_if_empty(text[pos:r_end]), _none_if_empty(strip_think_tags(text[c_start:]))


_START, _AFTER_OPEN, _REASONING, _AFTER_CLOSE, _CONTENT = range(5)


class ReasoningStreamParser:
    """Incremental ``parse_reasoning``.

    ``feed(delta)`` and ``finish()`` return ``[(kind, text), ...]`` with kind ``"reasoning"`` or
    ``"content"``, non-empty texts, adjacent pieces of one kind merged. Call ``finish()`` once at the
    end of the output; it flushes held-back text."""

    def __init__(self, prompt_in_thinking: bool) -> None:
        self.prompt_in_thinking = bool(prompt_in_thinking)
        self._state = _START
        self._buf = ""
        self._content = _TagStripper()
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """True while the text seen so far ends inside the reasoning (useful for thinking budgets)."""
        if self._state == _START:
            return self.prompt_in_thinking or (bool(self._buf) and THINK_OPEN.startswith(self._buf))
        return self._state in (_AFTER_OPEN, _REASONING)

    def feed(self, delta: str) -> list[tuple[str, str]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[tuple[str, str]]:
        if self._finished:
            return []
        out = self._run(final=True)
        self._finished = True
        return out

    def _run(self, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []

        def emit(kind: str, text: str) -> None:
            if not text:
                return
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + text)
            else:
                out.append((kind, text))

        while True:
            buf = self._buf
            if self._state == _START:
                if buf.startswith(THINK_OPEN):
                    self._buf = buf[len(THINK_OPEN):]
                    self._state = _AFTER_OPEN
                elif THINK_OPEN.startswith(buf) and not final:
                    return out  # could still become "<think>"
                else:
                    self._state = _REASONING if self.prompt_in_thinking else _CONTENT
            elif self._state == _AFTER_OPEN:
                if not buf:
                    return out
                if buf[0] == "\n":
                    self._buf = buf[1:]
                self._state = _REASONING
            elif self._state == _REASONING:
                i = buf.find(THINK_CLOSE)
                if i >= 0:
                    r = buf[:i]
                    emit(REASONING, r[:-1] if r.endswith("\n") else r)
                    self._buf = buf[i + len(THINK_CLOSE):]
                    self._state = _AFTER_CLOSE
                    continue
                if final:
                    emit(REASONING, buf)
                    self._buf = ""
                    return out
                hold = len(buf)
                for k in range(min(len(THINK_CLOSE) - 1, len(buf)), 0, -1):
                    if THINK_CLOSE.startswith(buf[-k:]):
                        hold = len(buf) - k
                        break
                if hold > 0 and buf[hold - 1] == "\n":
                    hold -= 1  # a "\n" directly before "</think>" is removed
                emit(REASONING, buf[:hold])
                self._buf = buf[hold:]
                return out
            elif self._state == _AFTER_CLOSE:
                if not buf:
                    return out
                if buf[0] == "\n":
                    self._buf = buf[1:]
                self._state = _CONTENT
            else:  # _CONTENT
                self._buf = ""
                emit(CONTENT, self._content.feed(buf))
                if final:
                    emit(CONTENT, self._content.finish())
                return out
