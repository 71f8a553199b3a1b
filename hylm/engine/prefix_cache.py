"""Prefix caching for hybrid models.

A KV cache can be cut at any token, a Mamba state cannot: it exists only at the positions where it was
saved. The cache therefore holds *checkpoints*: at a position p of some token sequence, copies of every
Mamba layer's conv and SSM state plus references on the KV blocks of the first p tokens. Checkpoints
are taken at the end of every prompt, at the end of every finished generation (the next chat turn
starts with the whole previous conversation), and within long prompts: every `interval` tokens at
first, then sparser as the prompt goes on (see `spacing`).

A new request resumes from the longest checkpoint whose tokens are a prefix of its prompt (leaving at
least one prompt token to compute, for the first logits). Lookup walks the prompt's chained block
hashes; a checkpoint is keyed by the hash of the full blocks before p and the tokens of the partial
block, and its exact tokens are compared before use. Checkpoints live under a byte budget (their state
copies) with LRU eviction; their KV blocks are released when they are evicted, and they are evicted
first when the engine runs short of KV blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .state_pool import StatePool

DENSE_CHECKPOINTS = 16


def _chain(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


def block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """h[j] identifies tokens[: j * block_size]; h[0] is the empty prefix."""
    out = [b""]
    for j in range(len(tokens) // block_size):
        out.append(_chain(out[-1], tokens[j * block_size: (j + 1) * block_size]))
    return out


@dataclass
class Checkpoint:
    tokens: tuple[int, ...]
    states: dict[int, tuple[torch.Tensor, torch.Tensor]]
    blocks: list[int]
    nbytes: int

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: dict[str, int] = field(default_factory=lambda: {"no_checkpoint": 0, "evicted": 0, "different_tokens": 0})
    tokens_reused: int = 0
    checkpoints_taken: int = 0
    evictions: int = 0
    bytes_used: int = 0
    budget_bytes: int = 0


class PrefixCache:
    def __init__(self, pool: StatePool, budget_bytes: int, interval_blocks: int = 16):
        self.pool = pool
        self.block_size = pool.block_size
        self.budget = budget_bytes
        self.interval = interval_blocks * pool.block_size
        self.entries: OrderedDict[tuple[bytes, tuple[int, ...]], Checkpoint] = OrderedDict()  # LRU order
        self.by_block: dict[bytes, set[tuple[bytes, tuple[int, ...]]]] = {}
        self.prefix_blocks: dict[bytes, int] = {}  # chained hashes of cached prefixes -> refcount
        self.evicted: OrderedDict[tuple[bytes, tuple[int, ...]], None] = OrderedDict()  # recent, bounded
        self.stats = PrefixCacheStats(budget_bytes=budget_bytes)
        self._miss_reason = "different_tokens"

    # ---- keys -----------------------------------------------------------------------------------------
    def _key(self, tokens: list[int] | tuple[int, ...], hashes: list[bytes] | None = None
             ) -> tuple[bytes, tuple[int, ...]]:
        full = len(tokens) // self.block_size
        h = hashes[full] if hashes is not None else block_hashes(list(tokens[: full * self.block_size]),
                                                                   self.block_size)[-1]
        return h, tuple(tokens[full * self.block_size:])

    def spacing(self, pos: int) -> int:
        """Checkpoint spacing at position pos: `interval` over the first DENSE_CHECKPOINTS intervals of a
        prompt, then doubling with the position (DENSE_CHECKPOINTS / 2 per doubling). Each checkpoint
        costs O(pos) (its key hashes and token copy), so a long prompt gets O(log T) of them, not T /
        interval: O(T) work in all instead of O(T^2)."""
        step, reach = self.interval, self.interval * DENSE_CHECKPOINTS
        while pos > reach:
            step, reach = 2 * step, 2 * reach
        return step

    def checkpoint_positions(self, prompt_len: int, start: int, end: int) -> list[int]:
        """Where to save state between computed positions start (exclusive) and end (inclusive)."""
        marks = [m for m in range((start // self.interval + 1) * self.interval, min(end, prompt_len) + 1, self.interval)
                 if m % self.spacing(m) == 0]
        if start < prompt_len <= end:
            marks.append(prompt_len)
        return sorted(set(marks))

    # ---- lookup ---------------------------------------------------------------------------------------
    def match(self, prompt: list[int]) -> Checkpoint | None:
        """The longest checkpoint whose tokens are a proper prefix of prompt (None: see miss_reason)."""
        hashes = block_hashes(prompt, self.block_size)
        best, blocks_known = None, False
        for j in range(len(hashes) - 1, -1, -1):
            keys = self.by_block.get(hashes[j])
            blocks_known = blocks_known or hashes[j] in self.prefix_blocks and j > 0
            if not keys:
                continue
            base = j * self.block_size
            for key in keys:
                ck = self.entries[key]
                end = base + len(key[1])
                if end < len(prompt) and (best is None or end > best.length) \
                        and tuple(prompt[base:end]) == key[1] and tuple(prompt[:end]) == ck.tokens:
                    best = ck
            if best is not None:
                break
        if best is not None:
            self.entries.move_to_end(self._key(best.tokens))
            return best
        if any((hashes[j], ()) in self.evicted for j in range(1, len(hashes))):
            self._miss_reason = "evicted"
        elif blocks_known:
            self._miss_reason = "no_checkpoint"  # cached conversations share these blocks, no state here
        else:
            self._miss_reason = "different_tokens"
        return None

    def record(self, hit: Checkpoint | None, admitted: bool) -> None:
        """Count an admission's lookup once, when the request is actually admitted."""
        if not admitted:
            return
        if hit is not None:
            self.stats.hits += 1
            self.stats.tokens_reused += hit.length
        else:
            self.stats.misses[self._miss_reason] += 1

    # ---- insertion and eviction ----------------------------------------------------------------------------
    def save(self, slot: int, tokens: list[int]) -> None:
        """Checkpoint slot's state after its first len(tokens) tokens (the slot's state is exactly there)."""
        if not tokens:
            return
        key = self._key(tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        states = self.pool.snapshot(slot)
        nbytes = sum(c.nbytes + s.nbytes for c, s in states.values())
        if nbytes > self.budget:
            return
        while self.stats.bytes_used + nbytes > self.budget and self.entries:
            self.evict_one()
        ck = Checkpoint(tuple(tokens), states, self.pool.share_blocks(slot, len(tokens)), nbytes)
        self.entries[key] = ck
        self.by_block.setdefault(key[0], set()).add(key)
        for h in block_hashes(list(tokens), self.block_size)[1:]:
            self.prefix_blocks[h] = self.prefix_blocks.get(h, 0) + 1
        self.evicted.pop(key, None)
        self.stats.bytes_used += nbytes
        self.stats.checkpoints_taken += 1

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        key, ck = self.entries.popitem(last=False)
        self.by_block[key[0]].discard(key)
        if not self.by_block[key[0]]:
            del self.by_block[key[0]]
        for h in block_hashes(list(ck.tokens), self.block_size)[1:]:
            self.prefix_blocks[h] -= 1
            if not self.prefix_blocks[h]:
                del self.prefix_blocks[h]
        self.pool.release_blocks(ck.blocks)
        self.stats.bytes_used -= ck.nbytes
        self.stats.evictions += 1
        self.evicted[key] = None
        self.evicted[(key[0], ())] = None  # remember the block prefix too, to explain later misses
        while len(self.evicted) > 4096:
            self.evicted.popitem(last=False)
        return True

    def free_blocks_for(self, needed: int, keep: Checkpoint | None = None) -> bool:
        """Evict checkpoints (LRU first, never `keep`) until `needed` KV blocks are free."""
        while self.pool.num_free_blocks < needed:
            if keep is not None and len(self.entries) == 1 and keep in self.entries.values():
                return False
            if keep is not None and next(iter(self.entries.values())) is keep:
                self.entries.move_to_end(self._key(keep.tokens))
            if not self.evict_one():
                return False
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
