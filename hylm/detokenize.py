"""Streaming detokenization: the text of a growing token sequence, a piece at a time, never cutting a character.

Byte-level BPE spreads one emoji or CJK character over several tokens, so a token's text only becomes known
when the tokens after it arrive. Knows nothing of any layer: it needs only an object with
``decode(ids, skip_special_tokens=...)`` (and optionally ``special_ids``), so the chat layer's tokenizer and the
engine's offline API share it. `StopStrings` wraps one to end the text at the first stop string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence, a piece per `add()`.

    The concatenation of every `add()` result and `finish()` equals `tokenizer.decode(all_ids)` (for byte-level
    BPE, byte-fallback and other decoders whose output for a sequence extends their output for a prefix cut at
    a character boundary). A character whose bytes are spread over several tokens is held back until its last
    byte arrives: while the decoded text ends with U+FFFD (an incomplete UTF-8 sequence decodes to it), the
    last few U+FFFD are not emitted. `finish()` flushes what is left.

    Each step decodes only a short window. The window starts at `_prefix`, a few tokens before `_read`, so that
    decoders which treat the start of a sequence specially (leading-space stripping) see the same context a
    full decode would; `_prefix_text` caches the decoded text of `_ids[_prefix:_read]`, and `_extra` counts the
    characters after it already emitted. The new text is what the decode of `_ids[_prefix:]` has beyond those.
    Whenever the window decodes cleanly (or, while it does not, at the latest token boundary where it does)
    the read point moves forward and the tokens before the old read point are dropped, so the work per token
    stays constant however long the output grows.
    """

    # An incomplete UTF-8 character is at most 3 bytes: it decodes to one U+FFFD (byte-level BPE) or one per
    # byte (byte fallback). So at most this many trailing U+FFFD can still turn into a character.
    held_replacements = 3
    # With an incomplete tail and more than this many tokens past the read point, look for a token boundary
    # (among the last `search_depth`) where the text is complete, and move the read point there.
    search_after = 8
    search_depth = 8
    # Past this many tokens without any complete boundary (a long run of invalid bytes), the read point is
    # moved to the end anyway, so the window stays bounded; valid text never gets here.
    max_window = 256

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens whose text is already emitted
        self._read = 0  # the text of _ids[:_read] is emitted in full
        self._prefix_text = ""  # decode(_ids[_prefix:_read])
        self._extra = 0  # characters after _prefix_text already emitted
        self.num_tokens = 0  # tokens fed so far
        self.text_len = 0  # characters emitted so far

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed new token ids; returns the text they complete (possibly "")."""
        if isinstance(token_ids, int):
            new = [token_ids]
        else:
            new = [int(t) for t in token_ids]
        if not new:
            return ""
        self._ids.extend(new)
        self.num_tokens += len(new)
        return self._step(final=False)

    def finish(self) -> str:
        """Flush whatever is held back (an incomplete character comes out as U+FFFD, as in a full decode)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        text = self._decode(self._ids[self._prefix:])
        emitted = len(self._prefix_text) + self._extra  # characters of `text` already emitted
        if final or not text.endswith(_REPLACEMENT):
            out = text[emitted:]
            self.text_len += len(out)
            self._move_read(len(self._ids), len(text))
            return out
        held = len(text) - len(text.rstrip(_REPLACEMENT))
        safe = len(text) - min(held, self.held_replacements)
        out = text[emitted:safe] if safe > emitted else ""
        self._extra += len(out)
        self.text_len += len(out)
        if len(self._ids) - self._read > self.search_after:
            self._shorten(emitted + len(out))
        return out

    def _shorten(self, emitted: int) -> None:
        """The tail is incomplete and the window is getting long: move the read point to the latest token
        boundary where the decoded text is complete."""
        end = len(self._ids)
        for k in range(end - 1, max(self._read, end - 1 - self.search_depth), -1):
            head = self._decode(self._ids[self._prefix:k])
            if head and not head.endswith(_REPLACEMENT) and len(head) <= emitted:
                self._move_read(k, emitted)
                return
        if end - self._prefix > self.max_window:
            self._move_read(end, emitted)

    def _move_read(self, end: int, emitted: int) -> None:
        """Move the read point to `end` (the text up to it is emitted); `emitted` counts the characters of
        the current window's text emitted so far. The tokens after the old read point become the context."""
        if end <= self._read:
            return
        context = self._decode(self._ids[self._read:end])
        if context or end - self._prefix > self.max_window:
            drop = self._read
            self._extra = max(0, emitted - len(self._prefix_text) - len(context))
            self._prefix_text = context
        else:
            specials = getattr(self.tokenizer, "special_ids", None)
            if self.skip_special_tokens and specials and all(t in specials for t in self._ids[self._read:end]):
                # skipped special tokens: they add nothing to any decode, so forget them
                del self._ids[self._read:end]
                return
            # the new tokens decode to nothing on their own: keep the old context, which has text
            drop = self._prefix
            self._extra = max(0, emitted - len(self._prefix_text))
        self._ids = self._ids[drop:]
        self._read = end - drop
        self._prefix = 0


def find_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """Earliest stop string occurring in text at or after `start`: (position, the string)."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the text that can be shown: the rest is a proper prefix of some stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


class StopStrings:
    """A detokenizer wrapper: text passes through until the first stop string (left out, recorded in
    `matched`); a tail that may still become a stop string is held back until the next piece decides."""

    def __init__(self, detok: Any, stops: list[str]):
        self.detok, self.stops = detok, stops
        self.held = ""
        self.matched: str | None = None

    def add(self, token_ids) -> str:
        return self._push(self.detok.add(token_ids), final=False)

    def finish(self) -> str:
        return self._push(self.detok.finish(), final=True)

    def _push(self, piece: str, final: bool) -> str:
        if self.matched is not None:
            return ""
        text = self.held + piece
        hit = find_stop(text, self.stops)
        if hit is not None:
            self.matched, self.held = hit[1], ""
            return text[: hit[0]]
        keep = len(text) if final else safe_prefix_len(text, self.stops)
        self.held = text[keep:]
        return text[:keep]
