"""GQA attention without positional encoding (Nemotron-H is NoPE), over packed variable-length batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .batch import Batch, State

# Above this many attention scores per sequence and layer (t queries x context x heads) in a chunk that
# continues earlier context, attention reads the KV in windows with an online softmax: memory stays
# bounded by the window, whatever the context length. Below it (and always without earlier context)
# the fused SDPA kernel is faster.
SCORE_BUDGET = 1 << 30


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, batch: Batch, state: State | None) -> torch.Tensor:
        """x: [N, D] packed tokens -> [N, D]."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # [N, Hq, hd]
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [N, Hkv, hd]
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [N, Hkv, hd]

        if state is None and batch.is_uniform and batch.context_lens[0] == 0:
            b, t = batch.num_seqs, batch.seq_lens[0]
            out = self._attend(q.view(b, t, *q.shape[1:]), k.view(b, t, *k.shape[1:]),
                               v.view(b, t, *v.shape[1:]), context=0)  # [B, T, Hq, hd]
            return self.o_proj(out.reshape(n, -1))

        out = torch.empty_like(q)
        for i in range(batch.num_seqs):
            lo, hi = batch.offsets[i], batch.offsets[i + 1]
            ctx = batch.context_lens[i]
            if state is None:
                if ctx:
                    raise ValueError("a sequence with earlier context needs a state to read it from")
                keys, values = k[lo:hi], v[lo:hi]
            elif ctx and self.num_heads * (hi - lo) * (ctx + hi - lo) > SCORE_BUDGET and hasattr(state, "kv_read"):
                state.kv_write(self.layer_idx, batch.slots[i], ctx, k[lo:hi], v[lo:hi])
                out[lo:hi] = self._attend_windowed(q[lo:hi], state, batch.slots[i], ctx)
                continue
            else:
                keys, values = state.kv_append(self.layer_idx, batch.slots[i], ctx, k[lo:hi], v[lo:hi])
            out[lo:hi] = self._attend(q[None, lo:hi], keys[None], values[None], context=ctx)[0]
        return self.o_proj(out.view(n, -1))

    def _attend_windowed(self, q: torch.Tensor, state: State, slot: int, context: int) -> torch.Tensor:
        """q [t, Hq, hd] at positions context..context+t attends causally to the slot's KV, read in
        windows; an online softmax keeps a running max, denominator and weighted sum. -> [t, Hq, hd]"""
        t = q.shape[0]
        kvh, g = self.num_kv_heads, self.num_heads // self.num_kv_heads
        total = context + t
        window = max(256, SCORE_BUDGET // (self.num_heads * t))
        qh = q.view(t, kvh, g, -1).permute(1, 2, 0, 3).reshape(kvh, g * t, -1) * self.scale  # [Hkv, g*t, hd]
        qpos = (torch.arange(t, device=q.device) + context).repeat(g)  # [g*t] position of each query row
        m = torch.full((kvh, g * t), float("-inf"), device=q.device)
        denom = torch.zeros(kvh, g * t, device=q.device)
        acc = torch.zeros(kvh, g * t, qh.shape[-1], device=q.device)
        for lo in range(0, total, window):
            hi = min(total, lo + window)
            kw, vw = state.kv_read(self.layer_idx, slot, lo, hi)  # [w, Hkv, hd]
            scores = (qh @ kw.permute(1, 2, 0).to(qh.dtype)).float()  # [Hkv, g*t, w]
            if hi > context + 1:  # some keys of this window lie after some queries
                future = torch.arange(lo, hi, device=q.device).unsqueeze(0) > qpos.unsqueeze(1)  # [g*t, w]
                scores.masked_fill_(future, float("-inf"))
            m_new = torch.maximum(m, scores.amax(-1))
            probs = torch.exp(scores - m_new.unsqueeze(-1))  # [Hkv, g*t, w]
            rescale = torch.exp(m - m_new)
            denom = denom * rescale + probs.sum(-1)
            acc = acc * rescale.unsqueeze(-1) + probs @ vw.permute(1, 0, 2).float()  # [Hkv, g*t, hd]
            m = m_new
        out = (acc / denom.unsqueeze(-1)).view(kvh, g, t, -1)  # [Hkv, g, t, hd]
        return out.permute(2, 0, 1, 3).reshape(t, self.num_heads, -1).to(q.dtype)  # [t, Hq, hd]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
        """q [B, t, Hq, hd] attends causally to k, v [B, context + t, Hkv, hd]; returns [B, t, Hq, hd]."""
        t, total = q.shape[1], k.shape[1]
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
