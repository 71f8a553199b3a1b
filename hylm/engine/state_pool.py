"""Fixed sequence slots for the Mamba layers' state and a paged KV cache for the attention layers.

A hybrid model's per-sequence memory has two parts: a fixed-size recurrent state (conv window + fp32
SSM state of every Mamba layer), held in one of `num_slots` slots, and a KV cache that grows with the
sequence but only for the few attention layers, held in fixed-size blocks listed in a block table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ATTENTION, MAMBA, ModelConfig
from ..model.batch import Batch


@dataclass
class PoolSizes:
    num_slots: int
    num_blocks: int
    block_size: int
    max_model_len: int
    slot_bytes: int
    block_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.slot_bytes + self.num_blocks * self.block_bytes

    def describe(self) -> str:
        gib = 1024 ** 3
        return (f"state pool: {self.num_slots} sequence slots x {self.slot_bytes / 2**20:.2f} MiB, "
                f"{self.num_blocks} KV blocks x {self.block_size} tokens ({self.num_blocks * self.block_size} tokens, "
                f"{self.block_bytes * self.num_blocks / 2**20:.1f} MiB), max length {self.max_model_len}, "
                f"total {self.total_bytes / gib:.3f} GiB")


def mtp_attention_layers(config: ModelConfig) -> list[int]:
    """State ids of the MTP block's attention layers (numbered after the main model's layers)."""
    return [config.num_hidden_layers + j for j, k in enumerate(config.mtp_pattern) if k == ATTENTION]


def plan_pool(config: ModelConfig, max_num_seqs: int = 8, max_model_len: int | None = None,
              memory_bytes: int | None = None, block_size: int = 16, dtype: torch.dtype = torch.float32,
              with_mtp: bool = False, kv_dtype: torch.dtype | None = None) -> PoolSizes:
    """Size the pool. Without a byte budget every slot can hold a full max_model_len of KV; with one,
    slots come first (up to max_num_seqs) and the rest of the budget becomes KV blocks. dtype: the conv
    windows' (and, unless kv_dtype says otherwise, the KV cache's)."""
    if max_num_seqs < 1:
        raise ValueError("max_num_seqs must be >= 1")
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    max_model_len = max_model_len or config.max_position_embeddings
    if max_model_len < 2:
        raise ValueError("max_model_len must be >= 2")
    elt = torch.empty((), dtype=dtype).element_size()
    kv_elt = torch.empty((), dtype=kv_dtype or dtype).element_size()
    slot_bytes = config.ssm_state_bytes_per_sequence(conv_dtype_bytes=elt)
    block_bytes = config.kv_cache_bytes_per_token(dtype_bytes=kv_elt) * block_size
    if with_mtp:  # the MTP block's attention keeps its own KV, in the same blocks
        block_bytes += (len(mtp_attention_layers(config)) * 2 * config.num_key_value_heads * config.head_dim * kv_elt
                        * block_size)
    blocks_per_seq = math.ceil(max_model_len / block_size)
    has_kv = block_bytes > 0
    if memory_bytes is None:
        num_slots, num_blocks = max_num_seqs, (blocks_per_seq * max_num_seqs if has_kv else 0)
    else:
        num_slots = min(max_num_seqs, memory_bytes // max(slot_bytes, 1)) if slot_bytes else max_num_seqs
        if num_slots < 1:
            raise ValueError(f"memory budget {memory_bytes} B cannot hold one sequence's state ({slot_bytes} B)")
        left = memory_bytes - num_slots * slot_bytes
        num_blocks = left // block_bytes if has_kv else 0
        if has_kv and num_blocks < 1:
            raise ValueError(f"memory budget {memory_bytes} B leaves no room for KV blocks after {num_slots} slots")
        if has_kv:
            max_model_len = min(max_model_len, num_blocks * block_size)
    return PoolSizes(int(num_slots), int(num_blocks), block_size, int(max_model_len), slot_bytes, block_bytes)


def _normal_tensor(n: int) -> torch.Tensor:
    """An int64 buffer that can be updated in place inside and outside inference mode (one made inside it would be
    an inference tensor: read-only outside)."""
    with torch.inference_mode(False):
        return torch.empty(n, dtype=torch.long)


class StatePool:
    """Implements the model's `State` protocol over slots and paged KV, plus allocation."""

    def __init__(self, config: ModelConfig, sizes: PoolSizes, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", with_mtp: bool = False, kv_dtype: torch.dtype | None = None):
        c = config
        self.config, self.sizes, self.dtype, self.device = config, sizes, dtype, device
        self.kv_dtype = kv_dtype or dtype
        self.block_size = sizes.block_size
        s = sizes.num_slots
        self.conv = {i: torch.zeros(s, c.mamba_conv_dim, c.conv_kernel - 1, dtype=dtype, device=device)
                     for i in c.layer_indices(MAMBA)}
        self.ssm = {i: torch.zeros(s, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, dtype=torch.float32,
                                   device=device) for i in c.layer_indices(MAMBA)}
        # head-major: [Hkv, blocks * block_size, hd]. A run of consecutive blocks is then one contiguous
        # [L, hd] range per head, which the CPU flash kernel reads ~2x faster at long context than the
        # token-major [blocks, block, Hkv, hd] (positions Hkv * hd apart).
        kv_shape = (c.num_key_value_heads, sizes.num_blocks * self.block_size, c.head_dim)
        kv_layers = c.layer_indices(ATTENTION) + (mtp_attention_layers(c) if with_mtp else [])
        self.k = {i: torch.zeros(kv_shape, dtype=self.kv_dtype, device=device) for i in kv_layers}
        self.v = {i: torch.zeros(kv_shape, dtype=self.kv_dtype, device=device) for i in kv_layers}
        self.free_slots = list(range(s - 1, -1, -1))  # pop() hands out slot 0 first
        self.free_blocks = list(range(sizes.num_blocks - 1, -1, -1))
        self.block_tables: dict[int, list[int]] = {}  # slot -> KV block ids in sequence order
        self._mirrors: dict[int, list] = {}  # slot -> [its table list, block ids tensor, entries filled]
        self.refs = [0] * sizes.num_blocks
        self.has_kv = bool(self.k)
        self._decode_rows: tuple | None = None  # (the batch, its padded cache rows, its new tokens' rows)
        self._paged: tuple | None = None  # (the batch, its block tables, lengths, new tokens' rows, longest)

    # ---- allocation ----------------------------------------------------------------------------
    # KV blocks are reference-counted: a block may be shared by running sequences and prefix-cache
    # checkpoints. Shared blocks are always full and never written again; only a sequence's own last
    # block is written, so sharing needs no copy except for a partially filled block (see `adopt`).
    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, slot: int | None, num_tokens: int) -> int:
        """Extra blocks a sequence needs to hold num_tokens tokens in total."""
        if not self.has_kv:
            return 0
        have = len(self.block_tables.get(slot, [])) if slot is not None else 0
        return max(0, math.ceil(num_tokens / self.block_size) - have)

    def allocate_slot(self) -> int:
        slot = self.free_slots.pop()
        self.block_tables[slot] = []
        return slot

    def _new_block(self) -> int:
        block = self.free_blocks.pop()
        self.refs[block] = 1
        return block

    def reserve(self, slot: int, num_tokens: int) -> bool:
        """Make room for num_tokens tokens in slot's KV; False (and no change) when blocks run out."""
        need = self.blocks_needed(slot, num_tokens)
        if need > len(self.free_blocks):
            return False
        table = self.block_tables[slot]
        for _ in range(need):
            table.append(self._new_block())
        return True

    def release_blocks(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_blocks.append(b)

    def free(self, slot: int) -> None:
        self.release_blocks(self.block_tables.pop(slot))
        self._mirrors.pop(slot, None)
        self.free_slots.append(slot)

    # ---- prefix-cache support -------------------------------------------------------------------------
    def share_blocks(self, slot: int, num_tokens: int) -> list[int]:
        """Take a reference on the blocks holding slot's first num_tokens tokens (for a checkpoint)."""
        blocks = self.block_tables[slot][: math.ceil(num_tokens / self.block_size)] if self.has_kv else []
        for b in blocks:
            self.refs[b] += 1
        return list(blocks)

    def adopt(self, slot: int, blocks: list[int], num_tokens: int) -> bool:
        """Give an empty slot the KV of a cached prefix of num_tokens tokens: full blocks are shared, a
        partially filled last block is copied (the slot will write into it). False if no block is free."""
        if not self.has_kv:
            return True
        full, partial = divmod(num_tokens, self.block_size)
        if partial and not self.free_blocks:
            return False
        table = self.block_tables[slot]
        for b in blocks[:full]:
            self.refs[b] += 1
            table.append(b)
        if partial:
            own = self._new_block()
            dst, src = own * self.block_size, blocks[full] * self.block_size
            for layer in self.k:
                for cache in (self.k[layer], self.v[layer]):
                    cache[:, dst: dst + partial] = cache[:, src: src + partial]
            table.append(own)
        return True

    def snapshot(self, slot: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Copies of slot's conv and SSM state of every Mamba layer."""
        return {i: (self.conv[i][slot].clone(), self.ssm[i][slot].clone()) for i in self.conv}

    def restore(self, slot: int, states: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, (conv, ssm) in states.items():
            self.conv[i][slot].copy_(conv)
            self.ssm[i][slot].copy_(ssm)

    # ---- the model's State protocol -----------------------------------------------------------------
    def mamba(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[layer], self.ssm[layer]

    def _table(self, slot: int, first: int, last: int) -> torch.Tensor:
        """Block ids first..last of slot's table as a CPU tensor. A per-slot mirror is extended as the table
        grows: converting the whole list for every layer and step would cost O(context) per decoded token.
        A table replaced wholesale (by a worker process) or shortened rebuilds the mirror."""
        table = self.block_tables[slot]
        m = self._mirrors.get(slot)
        if m is None or m[0] is not table or m[2] > len(table):
            m = self._mirrors[slot] = [table, _normal_tensor(max(16, len(table))), 0]
        if m[2] < len(table):
            if len(table) > m[1].numel():  # grow by doubling: amortised O(1) per block
                grown = _normal_tensor(max(len(table), 2 * m[1].numel()))
                grown[: m[2]] = m[1][: m[2]]
                m[1] = grown
            m[1][m[2]: len(table)] = torch.tensor(table[m[2]:], dtype=torch.long)
            m[2] = len(table)
        return m[1][first:last]

    def _block_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Cache rows of every position in blocks ids [..., n] -> [..., n * block_size] (row = block * size + offset)."""
        bs = self.block_size
        return (ids[..., None] * bs + torch.arange(bs, device=ids.device)).flatten(-2)

    def kv_write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[0]
        first = start // self.block_size
        table = self._table(slot, first, math.ceil(end / self.block_size)).to(k.device)
        pos = torch.arange(start, end, device=k.device)
        rows = table[pos // self.block_size - first] * self.block_size + pos % self.block_size  # [t] cache rows
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache[:, rows] = new.transpose(0, 1).to(cache.dtype)  # [Hkv, t, hd]

    def kv_read(self, layer: int, slot: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions lo..hi: a view of the cache where their blocks are consecutive (a lone long request's
        usually are: free blocks are handed out in order), else a gathered copy."""
        first = lo // self.block_size
        ids = self._table(slot, first, math.ceil(hi / self.block_size))
        a, b = lo - first * self.block_size, hi - first * self.block_size
        n = ids.numel()
        bs = self.block_size
        if n and int(ids[-1]) - int(ids[0]) == n - 1 and (n == 1 or bool((ids.diff() == 1).all())):
            r0 = int(ids[0]) * bs
            keys, values = self.k[layer][:, r0 + a: r0 + b], self.v[layer][:, r0 + a: r0 + b]  # [Hkv, L, hd] views
        else:
            rows = self._block_rows(ids.to(self.k[layer].device))[a:b]  # [L] cache rows
            keys, values = self.k[layer][:, rows], self.v[layer][:, rows]  # [Hkv, L, hd] copies
        return keys.transpose(0, 1), values.transpose(0, 1)  # [hi - lo, Hkv, hd]

    def kv_decode(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per sequence of batch: store k, v [B, Hkv, hd] at its position (its context length)
        and return every sequence's keys and values up to its new token, padded to the longest:
        [B, L, Hkv, hd] each (L = longest context + 1; rows past a sequence's own length hold other data and
        must be masked). The cache rows are worked out once per batch and shared by all its attention layers."""
        slots, positions = batch.slots, batch.context_lens
        if self._decode_rows is None or self._decode_rows[0] is not batch:
            bs = self.block_size
            longest = max(positions) + 1
            per_seq = math.ceil(longest / bs)
            ids = torch.tensor([self.block_tables[s][: p // bs + 1] + [0] * (per_seq - p // bs - 1)
                                for s, p in zip(slots, positions)], dtype=torch.long)  # [B, blocks]
            rows = self._block_rows(ids)[:, :longest]  # [B, L]
            new_rows = rows[torch.arange(len(slots)), torch.tensor(positions)]  # [B]
            device = k.device
            self._decode_rows = (batch, rows.to(device), new_rows.to(device))
        _, rows, new_rows = self._decode_rows
        out = []
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache[:, new_rows] = new.transpose(0, 1).to(cache.dtype)  # [Hkv, B, hd]
            out.append(cache[:, rows].permute(1, 2, 0, 3))  # [Hkv, B, L, hd] -> [B, L, Hkv, hd]
        return out[0], out[1]

    def kv_paged_layout(self, layer: int, batch: Batch
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """Where the batch's new tokens go in the paged cache and what each reads, one entry per new token:
        (k_cache, v_cache [Hkv, R, hd], block tables [N, max_blocks] int64 (its sequence's; rows may be one row
        expanded, stride 0), lengths [N] int64
        (the positions it sees: its own and all before), new_rows [N] int64 (its cache row), block size, the
        longest length). Built once per batch and shared by its layers; stores nothing."""
        if self._paged is None or self._paged[0] is not batch:
            bs = self.block_size
            needed = [math.ceil((c + n) / bs) for c, n in zip(batch.context_lens, batch.seq_lens)]
            positions_list = [p for c, n in zip(batch.context_lens, batch.seq_lens) for p in range(c, c + n)]
            per_seq = self._tables(batch.slots, needed)  # [B, width]
            if batch.num_seqs == 1:  # one sequence: one row every token reads (no copy)
                tables = per_seq.expand(batch.seq_lens[0], -1)  # [N, blocks]
            else:
                tables = per_seq if max(batch.seq_lens) == 1 else per_seq[
                    torch.repeat_interleave(torch.arange(batch.num_seqs), torch.tensor(batch.seq_lens))]  # [N, width]
            new_rows = []
            for slot, c, n in zip(batch.slots, batch.context_lens, batch.seq_lens):
                table = self.block_tables[slot]
                new_rows += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            device = self.k[layer].device
            lengths = torch.tensor([p + 1 for p in positions_list], dtype=torch.long, device=device)
            self._paged = (batch, tables.to(device), lengths, torch.tensor(new_rows, dtype=torch.long, device=device),
                           max(positions_list) + 1)
        _, tables, lengths, new_rows, longest = self._paged
        return self.k[layer], self.v[layer], tables, lengths, new_rows, self.block_size, longest

    def kv_block_tables(self, layer: int, slots: list[int], num_tokens: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(k_cache, v_cache [Hkv, R, hd], the blocks holding the first num_tokens[i] positions of slots[i]
        [len(slots), width] int64 (zero-padded; one slot: a view, no copy), block size), for a kernel that places
        positions itself (row = block * block size + offset)."""
        bs = self.block_size
        tables = self._tables(slots, [math.ceil(n / bs) for n in num_tokens])  # [B, width]
        return self.k[layer], self.v[layer], tables.to(self.k[layer].device), bs

    def _tables(self, slots: list[int], blocks: list[int]) -> torch.Tensor:
        """The first blocks[i] block ids of slots[i], one row each [len(slots), max(blocks)] int64, zero-padded:
        copied from the per-slot tensor mirrors (no Python list as long as the context: a 1M-token sequence has
        65K blocks of 16); one slot's row is a view of its mirror."""
        if len(slots) == 1:
            return self._table(slots[0], 0, blocks[0])[None]  # [1, blocks]
        tables = torch.zeros(len(slots), max(blocks), dtype=torch.long)  # [B, width]
        for i, (slot, nb) in enumerate(zip(slots, blocks)):
            tables[i, :nb] = self._table(slot, 0, nb)
        return tables

    def kv_paged(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """Store the new tokens' k, v [N, Hkv, hd] (packed as batch) at their positions and return the cache
        itself for a paged kernel: (k_cache, v_cache, tables, lengths, block size, longest) of
        `kv_paged_layout`."""
        k_cache, v_cache, tables, lengths, new_rows, block_size, longest = self.kv_paged_layout(layer, batch)
        for cache, new in ((k_cache, k), (v_cache, v)):
            cache[:, new_rows] = new.transpose(0, 1).to(cache.dtype)  # [Hkv, N, hd]
        return k_cache, v_cache, tables, lengths, block_size, longest

    def kv_append(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv_write(layer, slot, start, k, v)
        return self.kv_read(layer, slot, 0, start + k.shape[0])
