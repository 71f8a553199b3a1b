"""Haystacks and needles for `hylm niah`: seeded keys and values, and the text the needles hide in.

A haystack is a sequence of *sentence units*: each unit is one sentence with the whitespace that follows it
("The sky is blue. "), so joining units gives the text and every boundary between two units is a sentence end.
Sizing adds or removes whole units, and placement inserts needles only at unit boundaries.

Sources (all deterministic):
  * ``noise``: the five sentences "The grass is green. The sky is blue. The sun is yellow. Here we go. There and
    back again." repeated (the RULER-style filler);
  * ``essay``: essay-like prose from built-in sentence templates, paragraphs of 4-7 sentences, drawn from a
    seeded generator (a given seed always gives the same stream, so n units are a prefix of n + 1 units);
  * a file (or a directory of ``*.txt`` files, sorted): its text split into sentences, repeated when the target
    needs more than it holds.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from pathlib import Path
from typing import Iterator

VALUE_TYPES = ("numbers", "words", "uuids")
HAYSTACKS = ("noise", "essay")

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

# ---- words for keys (adjective-noun) and word values ------------------------------------------------------
ADJECTIVES = (
    "amber", "ancient", "brave", "brisk", "calm", "clever", "crimson", "curious", "dusty", "eager", "elegant",
    "fancy", "fierce", "fluffy", "frosty", "gentle", "gigantic", "glossy", "golden", "graceful", "grumpy",
    "hollow", "humble", "icy", "jolly", "keen", "lively", "lonely", "lucky", "mellow", "misty", "modern",
    "nimble", "noisy", "odd", "orange", "pale", "patient", "plucky", "polite", "proud", "quiet", "rapid",
    "restless", "rusty", "scarlet", "shiny", "silent", "silver", "sleepy", "slender", "smoky", "sneaky",
    "snowy", "sour", "spicy", "steady", "stormy", "sturdy", "sunny", "swift", "tame", "tiny", "tired",
    "velvet", "vivid", "wandering", "wild", "windy", "wise", "witty", "wooden", "young", "zealous",
)
NOUNS = (
    "anchor", "badger", "banjo", "barrel", "beacon", "beetle", "biscuit", "blanket", "bucket", "button",
    "cactus", "canyon", "carpet", "castle", "cello", "cherry", "chimney", "compass", "cricket", "dolphin",
    "dragon", "falcon", "feather", "fiddle", "forest", "fountain", "garden", "giraffe", "glacier", "hammer",
    "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "lizard", "magnet",
    "meadow", "mirror", "monkey", "mountain", "napkin", "needle", "otter", "paddle", "parrot", "pebble",
    "pepper", "pillow", "pirate", "planet", "pocket", "puzzle", "rabbit", "ribbon", "rocket", "saddle",
    "scooter", "shovel", "spider", "squirrel", "teapot", "thimble", "tiger", "trumpet", "tunnel", "turtle",
    "umbrella", "violin", "wagon", "walrus", "whistle", "window", "wizard", "zebra",
)


def make_key(rng: random.Random) -> str:
    """An adjective-noun key such as "shiny-walrus"."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def make_value(rng: random.Random, value_type: str) -> str:
    """A needle value: a 7-digit number, an adjective-noun word, or a UUID (all from `rng`)."""
    if value_type == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "words":
        return make_key(rng)
    if value_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"value type must be one of {', '.join(VALUE_TYPES)}, got {value_type!r}")


def distinct(rng: random.Random, make, n: int, avoid: set[str] = frozenset()) -> list[str]:
    """n distinct values of `make(rng)`, none in `avoid`."""
    out: list[str] = []
    seen = set(avoid)
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            break
        v = make(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    if len(out) < n:
        raise ValueError(f"cannot draw {n} distinct values")
    return out


# ---- sentence units --------------------------------------------------------------------------------------
_SENTENCE = re.compile(r"\S.*?(?:[.!?][\"')\]]*(?=\s|$)|$)\s*", re.DOTALL)


def split_sentences(text: str) -> list[str]:
    """Text -> sentence units (each a sentence and the whitespace after it; leading whitespace is dropped).
    A sentence ends at ".", "!" or "?" (closing quotes or brackets included) followed by whitespace."""
    units = [m.group(0) for m in _SENTENCE.finditer(text)]
    return [u if u[-1].isspace() else u + " " for u in units if u.strip()]


class Haystack:
    """An endless, deterministic stream of sentence units; `units(n)` is its first n."""

    name = "haystack"

    def __init__(self) -> None:
        self._cache: list[str] = []
        self._iter: Iterator[str] | None = None

    def _stream(self) -> Iterator[str]:
        raise NotImplementedError

    def units(self, n: int) -> list[str]:
        if n < 0:
            raise ValueError("a haystack has at least 0 sentences")
        if self._iter is None:
            self._iter = self._stream()
        while len(self._cache) < n:
            self._cache.append(next(self._iter))
        return self._cache[:n]

    def describe(self) -> str:
        return self.name


class NoiseHaystack(Haystack):
    name = "noise"

    def _stream(self) -> Iterator[str]:
        while True:
            for s in NOISE_SENTENCES:
                yield s + " "


class FileHaystack(Haystack):
    """A text file's sentences (or those of a directory's *.txt files, in name order), repeated."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix == ".txt" and f.is_file())
            if not files:
                raise ValueError(f"{path}: no .txt files in this directory")
        elif p.is_file():
            files = [p]
        else:
            raise ValueError(f"{path}: no such haystack file")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        self.sentences = split_sentences(text)
        if not self.sentences:
            raise ValueError(f"{path}: the haystack file holds no text")
        self.path = str(p)
        self.name = f"file:{p.name}"

    def _stream(self) -> Iterator[str]:
        while True:
            yield from self.sentences

    def describe(self) -> str:
        return f"file:{os.path.abspath(self.path)}"


# ---- essay-like prose --------------------------------------------------------------------------------------
_SLOTS = {
    "thinker": ("a careful founder", "an old engineer", "a young writer", "a seasoned teacher", "a cautious investor",
                "a patient gardener", "a good editor", "an early settler", "a curious student", "a restless painter",
                "an honest critic", "the town librarian"),
    "thing": ("a new idea", "a small company", "an unfinished essay", "a hard problem", "the first draft",
              "a quiet habit", "an odd hobby", "a long walk", "a simple tool", "the morning routine",
              "a shared notebook", "an empty room", "a narrow bridge", "the village market"),
    "quality": ("surprisingly durable", "harder than it looks", "worth the trouble", "easy to underestimate",
                "rarely obvious at first", "more common than people think", "oddly satisfying",
                "slow to mature", "fragile in the beginning", "better when shared"),
    "verb": ("notices", "questions", "rebuilds", "ignores", "studies", "describes", "admires", "revisits",
             "simplifies", "postpones", "defends", "measures"),
    "place": ("in a crowded city", "at the edge of a forest", "during a long winter", "on a quiet afternoon",
              "in a rented workshop", "near the old harbor", "after a difficult year", "in a small classroom",
              "along the river", "under a grey sky"),
    "reason": ("because the easy path is usually taken", "since nobody else is looking",
               "because habits compound over time", "since the details decide everything",
               "because attention is scarce", "since the world changes slowly and then suddenly",
               "because practice beats talent when talent does not practice",
               "since most plans fail in the same few ways"),
    "abstract": ("patience", "curiosity", "taste", "persistence", "honesty", "focus", "humility", "courage",
                 "clarity", "craftsmanship"),
}

_TEMPLATES = (
    "{Thinker} {verb} {thing} {place}.",
    "{Thing} is {quality}, {reason}.",
    "What matters most is {abstract}, not speed.",
    "It is tempting to say that {thing} is {quality}, but the truth is more subtle.",
    "{Thinker} once told me that {abstract} is learned rather than taught.",
    "If you look closely {place}, you will see {thinker} who {verb} {thing}.",
    "Nobody plans for {thing}; it simply appears {place}.",
    "The lesson here is about {abstract}, {reason}.",
    "Over time {thinker} {verb} {thing}, and the result is {quality}.",
    "This is why {abstract} and {abstract2} tend to travel together.",
    "You can ignore {thing} for a while, but not forever.",
    "Most of the work happens {place}, where nobody is watching.",
    "There is a difference between {thing} and {thing2}, and it is {quality}.",
    "Ask {thinker} and you will hear the same answer: {abstract}.",
    "In the end, {thing} is {quality}.",
    "A good rule is to start with {thing} and to keep {abstract} in mind.",
    "Why does {thinker} care so much about {thing}?",
    "The answer, as usual, is {abstract}.",
    "Sometimes {thing2} teaches more than {thing} ever could.",
    "{Thinker} rarely {verb} {thing} twice {place}.",
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class EssayHaystack(Haystack):
    """Essay-like prose: sentences from built-in templates, in paragraphs of 4-7 sentences (seeded)."""

    name = "essay"

    def __init__(self, seed: int | str = 0) -> None:
        super().__init__()
        self.seed = seed

    def _sentence(self, rng: random.Random) -> str:
        fill = {k: rng.choice(v) for k, v in _SLOTS.items()}
        fill["thing2"] = rng.choice([t for t in _SLOTS["thing"] if t != fill["thing"]])
        fill["abstract2"] = rng.choice([t for t in _SLOTS["abstract"] if t != fill["abstract"]])
        fill["Thinker"], fill["Thing"] = _cap(fill["thinker"]), _cap(fill["thing"])
        return _cap(rng.choice(_TEMPLATES).format(**fill))

    def _stream(self) -> Iterator[str]:
        rng = random.Random(f"hylm-niah-essay:{self.seed}")
        while True:
            k = rng.randint(4, 7)
            for i in range(k):
                yield self._sentence(rng) + ("\n\n" if i == k - 1 else " ")

    def describe(self) -> str:
        return "essay"


def make_haystack(kind: str | Haystack, seed: int | str = 0) -> Haystack:
    """"noise", "essay" (seeded) or a Haystack as is."""
    if isinstance(kind, Haystack):
        return kind
    if kind == "noise":
        return NoiseHaystack()
    if kind == "essay":
        return EssayHaystack(seed)
    raise ValueError(f"haystack must be one of {', '.join(HAYSTACKS)} or a file, got {kind!r}")
