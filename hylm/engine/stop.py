"""Stop strings over generated text: find the first match, and hold back text that may become one."""

from __future__ import annotations


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
