"""GQA attention without positional encoding (Nemotron-H is NoPE), over packed variable-length batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.decode_blocks import MAX_ROWS as BLOCK_MAX_ROWS
from ..ops.decode_blocks import prepare_native_attention
from ..ops.paged_attention import native_supported as paged_native_supported
from ..ops.paged_attention import paged_decode_attention
from .batch import Batch, State
from . import fused
from .linear import Linear
from .norm import RMSNorm

# A chunk that continues earlier context (a prefill chunk after the first, a decode step, a verification
# step) reads the KV in windows of this many tokens: each window goes through the fused flash kernel,
# which also returns the rows' log-sum-exp, and windows are merged by it. Memory stays bounded by one
# window whatever the context length, and nothing of size [queries x context] is ever materialised.
KV_WINDOW = 16384
# Where the fused kernel is missing (not CPU), windows are attended with plain matmuls: this caps their
# score tensors [heads, queries, window] in elements.
SCORE_BUDGET = 1 << 24
# One decode token for each of several sequences: their KV is gathered into one padded batch and attended in
# one call when the batch holds at most this many elements per K (else each sequence reads its own windows).
BATCHED_DECODE_MAX = 1 << 22
# Few new tokens over a short context attend in one call with an explicit mask of at most this many elements.
MASKED_CALL_MAX = 1 << 18
# Sequences with several new tokens (at most this many each) take the native kernel too while no context is
# longer than PAGED_MAX_CONTEXT_MULTI: each token reads its sequence's cached prefix on its own, which costs
# nothing while the prefix stays in cache and would multiply the reads of a long one.
PAGED_MAX_NEW_TOKENS = 16
PAGED_MAX_CONTEXT_MULTI = 8192
# Decode tokens read the paged KV cache through hylm's native kernel where it is built (benchmarks flip this
# to compare with the PyTorch paths in one process)
native_decode_enabled = True
try:
    _FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # an older torch without the op
    _FLASH_CPU = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = Linear(c.hidden_size, self.num_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def _block_sources(self, norm: nn.Module) -> tuple | None:
        """The weights the native block reads (norm, q, k, v, o), or None where a projection is not a plain
        bias-free Linear."""
        projections = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        if any(not isinstance(p, nn.Linear) or p.bias is not None for p in projections):
            return None
        return (norm.weight, *(p.weight for p in projections))

    def native_block_plan(self, norm: nn.Module):
        """The prepared native kernel for the whole block x + self(norm(x)) (see fused.py), or None."""
        if type(self).forward is not Attention.forward or type(norm).forward is not RMSNorm.forward:
            return None
        if not hasattr(self, "_plan_cache"):
            self._plan_cache = fused.PlanCache()
        sources = self._plan_cache.sources(lambda: self._block_sources(norm))
        return self._plan_cache.get(
            sources, lambda: prepare_native_attention(*sources[:1], norm.eps, *sources[1:], self.num_heads,
                                                      self.num_kv_heads, self.head_dim, self.scale))

    def native_block_args(self, plan, x: torch.Tensor, out: torch.Tensor, step: fused.NativeStep) -> tuple | None:
        """The kernel's arguments (k, v stored into the paged cache, every token attending through the paged
        kernel) where the paged path below would run with an fp32 cache, else None."""
        state, batch, n = step.state, step.batch, x.shape[0]
        if (state is None or n > BLOCK_MAX_ROWS or not native_decode_enabled or not hasattr(state, "kv_paged_layout")
                or getattr(state, "kv_dtype", torch.float32) != torch.float32 or not _paged_applies(n, batch)):
            return None
        k_cache, v_cache, tables, lengths, new_rows, block_size, longest = state.kv_paged_layout(self.layer_idx, batch)
        splits = plan.splits(n, longest)
        work = step.scratch(("attention", plan.kv_heads, plan.group, plan.head_dim, splits),
                            lambda: plan.work(n, splits))
        return plan.args(x, out, k_cache, v_cache, new_rows, tables, lengths, block_size, splits, work)

    def forward(self, x: torch.Tensor, batch: Batch, state: State | None) -> torch.Tensor:
        """x: [N, D] packed tokens -> [N, D]."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # [N, Hq, hd]
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [N, Hkv, hd]
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [N, Hkv, hd]
        kv_dtype = getattr(state, "kv_dtype", None)
        if kv_dtype is not None and kv_dtype != k.dtype:
            # a narrower KV cache: every path attends to the values the cache holds, so a prompt gives the
            # same result in one chunk or several
            k, v = k.to(kv_dtype).to(q.dtype), v.to(kv_dtype).to(q.dtype)

        if state is None and batch.is_uniform and batch.context_lens[0] == 0:
            b, t = batch.num_seqs, batch.seq_lens[0]
            out = self._attend(q.view(b, t, *q.shape[1:]), k.view(b, t, *k.shape[1:]),
                               v.view(b, t, *v.shape[1:]), context=0)  # [B, T, Hq, hd]
            return self.o_proj(out.reshape(n, -1))

        if (state is not None and hasattr(state, "kv_paged") and _paged_applies(n, batch)
                and self._native_decode(q, state)):
            # decode tokens (or a few new tokens per sequence over a short context: speculative verification,
            # the MTP's catch-up), all with earlier context: the native kernel reads the paged cache in place,
            # every token and head in one call, each token over the positions up to its own
            k_cache, v_cache, tables, lengths, block_size, longest = state.kv_paged(self.layer_idx, batch, k, v)
            qg = q.view(n, self.num_kv_heads, -1, self.head_dim)  # [B, Hkv, g, hd]: query head h reads KV head h // g
            out = paged_decode_attention(qg, k_cache, v_cache, tables, lengths, block_size, self.scale,
                                         longest=longest)
            return self.o_proj(out.reshape(n, -1))
        if (state is not None and hasattr(state, "kv_decode") and batch.num_seqs > 1 and n == batch.num_seqs
                and min(batch.context_lens) > 0
                and n * (max(batch.context_lens) + 1) * self.num_kv_heads * self.head_dim <= BATCHED_DECODE_MAX):
            return self.o_proj(self._decode_batched(q, k, v, batch, state).reshape(n, -1))
        out = torch.empty_like(q)
        for i in range(batch.num_seqs):
            lo, hi = batch.offsets[i], batch.offsets[i + 1]
            ctx = batch.context_lens[i]
            if state is None:
                if ctx:
                    raise ValueError("a sequence with earlier context needs a state to read it from")
                keys, values = k[lo:hi], v[lo:hi]
            elif ctx and hasattr(state, "kv_read"):
                state.kv_write(self.layer_idx, batch.slots[i], ctx, k[lo:hi], v[lo:hi])
                out[lo:hi] = self._attend_blocked(q[lo:hi], k[lo:hi], v[lo:hi], state, batch.slots[i], ctx)
                continue
            else:
                keys, values = state.kv_append(self.layer_idx, batch.slots[i], ctx, k[lo:hi], v[lo:hi])
            out[lo:hi] = self._attend(q[None, lo:hi], keys[None], values[None], context=ctx)[0]
        return self.o_proj(out.view(n, -1))

    def _attend_blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State, slot: int,
                        context: int) -> torch.Tensor:
        """q, k, v [t, H, hd] of positions context..context+t (k, v already stored) attend causally to the
        slot's KV: earlier positions in windows read from the state, the chunk's own keys causally, all
        merged by log-sum-exp. -> [t, Hq, hd]"""
        t = q.shape[0]
        kvh, g = self.num_kv_heads, self.num_heads // self.num_kv_heads
        # the g query heads sharing a KV head side by side, so unmasked windows need no repeated KV
        qf = q.view(t, kvh, g, -1).permute(1, 2, 0, 3).reshape(1, kvh, g * t, -1)  # [1, Hkv, g*t, hd]
        # a single query sees every key including its own: its whole context is one unmasked range
        past = context + 1 if t == 1 else context
        window = KV_WINDOW if self._fused(q) else min(KV_WINDOW, max(256, SCORE_BUDGET // (self.num_heads * t)))
        if 1 < t and context + t <= window and g * t * (context + t) <= MASKED_CALL_MAX:
            # a few new tokens over a short context (speculative verification): one masked call over the
            # stored keys, own ones included, instead of a past window + a causal window + their merge
            kw, vw = state.kv_read(self.layer_idx, slot, 0, context + t)  # [context + t, Hkv, hd]
            rows = (torch.arange(t, device=q.device) + context).repeat(g)  # [g*t] position of each query row
            allowed = torch.arange(context + t, device=q.device) <= rows[:, None]  # [g*t, context + t]
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device).masked_fill_(~allowed, -math.inf)
            acc, _ = self._window(qf, kw.permute(1, 0, 2)[None], vw.permute(1, 0, 2)[None], causal=False, mask=mask)
            out = acc.reshape(kvh, g, t, -1)  # [Hkv, g, t, hd]
            return out.permute(2, 0, 1, 3).reshape(t, self.num_heads, -1).to(q.dtype)  # [t, Hq, hd]
        acc = lse = None
        for lo in range(0, past, window):
            kw, vw = state.kv_read(self.layer_idx, slot, lo, min(past, lo + window))  # [w, Hkv, hd]
            o, l = self._window(qf, kw.permute(1, 0, 2)[None], vw.permute(1, 0, 2)[None], causal=False)
            acc, lse = _merge(acc, lse, o, l)
        if t > 1:  # the chunk's own keys, causally; query head h reads KV head h // g
            kh = k.repeat_interleave(g, dim=1).transpose(0, 1)[None]  # [1, Hq, t, hd]
            vh = v.repeat_interleave(g, dim=1).transpose(0, 1)[None]
            o, l = self._window(q.transpose(0, 1)[None], kh, vh, causal=True)  # [1, Hq, t, hd], [1, Hq, t]
            acc, lse = _merge(acc, lse, o.reshape(1, kvh, g * t, -1), l.reshape(1, kvh, g * t))
        out = acc.reshape(kvh, g, t, -1)  # [Hkv, g, t, hd]
        return out.permute(2, 0, 1, 3).reshape(t, self.num_heads, -1).to(q.dtype)  # [t, Hq, hd]

    def _decode_batched(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, state: State
                        ) -> torch.Tensor:
        """One new token for each of B sequences: their KV gathered into one padded batch, one masked kernel
        call. q, k, v [B, H, hd] -> [B, Hq, hd]"""
        keys, values = state.kv_decode(self.layer_idx, batch, k, v)  # [B, L, Hkv, hd]
        lens = torch.tensor(batch.context_lens, device=q.device) + 1  # [B]
        valid = torch.arange(keys.shape[1], device=q.device) < lens[:, None]  # [B, L]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
            attn_mask=valid[:, None, None, :], scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)  # [B, Hq, 1, hd]
        return out.squeeze(2)

    def _native_decode(self, q: torch.Tensor, state: State) -> bool:
        return native_decode_enabled and paged_native_supported(
            q.device, q.dtype, getattr(state, "kv_dtype", q.dtype), self.num_heads // self.num_kv_heads,
            self.head_dim)

    @staticmethod
    def _fused(x: torch.Tensor) -> bool:
        return _FLASH_CPU is not None and x.device.type == "cpu"

    def _window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [1, H, r, hd] attends to k, v [1, H, w, hd] (causal: r == w, query j sees keys 0..j; mask: an
        additive fp32 [r, w] instead). -> (output [1, H, r, hd], log-sum-exp of the scaled scores [1, H, r] fp32)"""
        if self._fused(q):
            # fp32 in: the kernel's output comes back in its input dtype, and each window's output would
            # otherwise be rounded to bf16/fp16 before the merge (a window's fp32 copy is bounded anyway)
            out, lse = _FLASH_CPU(q.float(), k.float(), v.float(), 0.0, causal, attn_mask=mask, scale=self.scale)
            return out, lse
        k, v = k.to(q.dtype), v.to(q.dtype)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale  # [1, H, r, w]
        if causal:
            scores.masked_fill_(torch.ones_like(scores[0, 0], dtype=torch.bool).triu_(1), float("-inf"))
        if mask is not None:
            scores = scores + mask
        lse = torch.logsumexp(scores, -1)  # [1, H, r]
        return torch.exp(scores - lse.unsqueeze(-1)) @ v.float(), lse

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
        """q [B, t, Hq, hd] attends causally to k, v [B, context + t, Hkv, hd]; returns [B, t, Hq, hd]."""
        t, total = q.shape[1], k.shape[1]
        k, v = k.to(q.dtype), v.to(q.dtype)  # a cache of another dtype
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, len, hd]
        if t == 1:
            mask, causal = None, False  # a single query sees the whole context
        elif context == 0:
            mask, causal = None, True
        else:
            # query j sits at absolute position context + j and sees keys 0..context + j
            rows = torch.arange(t, device=q.device).unsqueeze(1) + context
            mask, causal = torch.arange(total, device=q.device).unsqueeze(0) <= rows, False  # [t, total]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(1, 2)  # [B, t, Hq, hd]


def _paged_applies(n: int, batch: Batch) -> bool:
    """Whether the n new tokens of batch read the paged cache through the native kernel: all with earlier context,
    one per sequence (decode) or a few per sequence over short contexts (verification, the MTP's catch-up)."""
    return min(batch.context_lens) > 0 and (n == batch.num_seqs or (
        max(batch.seq_lens) <= PAGED_MAX_NEW_TOKENS and max(batch.context_lens) <= PAGED_MAX_CONTEXT_MULTI))


def _merge(acc: torch.Tensor | None, lse: torch.Tensor | None, out: torch.Tensor, out_lse: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine softmax-attention results over two disjoint key sets: outputs [..., r, hd] weighted by
    each set's share exp(lse_set - lse_both) of the rows' total mass. fp32."""
    out = out.float()
    if acc is None:
        return out, out_lse
    both = torch.logaddexp(lse, out_lse)  # [..., r]
    return (acc * torch.exp(lse - both).unsqueeze(-1) + out * torch.exp(out_lse - both).unsqueeze(-1)), both
