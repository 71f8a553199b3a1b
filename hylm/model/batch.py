"""How the packed tokens of one forward pass split into sequences, and the state they read and write.

The model runs on a packed batch: the new tokens of every sequence concatenated into one row [N].
Sequence i owns rows offsets[i]:offsets[i+1], continues from `context_lens[i]` tokens already in its
state, and keeps that state in `slots[i]` of the state object. The engine's state pool and the simple
contiguous cache below both implement the two methods the layers call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Batch:
    seq_lens: list[int]
    context_lens: list[int]
    slots: list[int]
    # sequences whose Mamba states are kept after every position (speculative verification: the
    # engine rolls back to the last accepted position); filled in `saved_states` by each Mamba layer
    keep_states: list[bool] | None = None
    # layer -> {seq: (conv [t, C, K-1], ssm [t, H, P, N])}, valid until the next forward that keeps states
    saved_states: dict = field(default_factory=dict)
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not (len(self.seq_lens) == len(self.context_lens) == len(self.slots)):
            raise ValueError("seq_lens, context_lens and slots must have one entry per sequence")
        self.offsets = [0]
        for n in self.seq_lens:
            self.offsets.append(self.offsets[-1] + n)

    @classmethod
    def uniform(cls, batch_size: int, seq_len: int, context_len: int = 0) -> "Batch":
        return cls([seq_len] * batch_size, [context_len] * batch_size, list(range(batch_size)))

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def is_uniform(self) -> bool:
        """All sequences have the same number of new tokens and the same context: one dense [B, T] batch."""
        return len(set(self.seq_lens)) == 1 and len(set(self.context_lens)) == 1

    def last_token_rows(self) -> list[int]:
        return [self.offsets[i + 1] - 1 for i in range(self.num_seqs)]


class State(Protocol):
    """Per-sequence recurrent state and attention KV, addressed by slot."""

    def mamba(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state [slots, conv_dim, K-1], ssm_state [slots, H, P, N] fp32) of Mamba layer `layer`."""
        ...

    def kv_append(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [t, Hkv, hd] at positions start..start+t of `slot`; return all keys and values
        [start + t, Hkv, hd] of that sequence for attention."""
        ...

    def kv_write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [t, Hkv, hd] at positions start..start+t of `slot`."""
        ...

    def kv_read(self, layer: int, slot: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [hi - lo, Hkv, hd] of positions lo..hi of `slot` (long contexts are read in windows)."""
        ...

    # Optional (the engine's pool has them; attention falls back to one sequence at a time without them):
    # kv_paged(layer, batch, k, v) stores the batch's new tokens and returns the paged cache itself with one
    # block table and length per new token, for the native decode kernel; kv_decode(layer, batch, k, v)
    # stores one new token per sequence and returns all their keys and values padded to the longest,
    # [B, L, Hkv, hd] each, for the PyTorch paths; kv_block_tables(layer, slots, num_tokens) returns the caches and
    # each slot's block ids, for kernels that place positions themselves (the MTP's native draft loop).
