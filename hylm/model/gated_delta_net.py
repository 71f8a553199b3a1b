"""Gated DeltaNet mixer (the linear-attention layer of Qwen3-Next / Qwen3.5-style hybrids).

    x -> in_proj_qkvz, in_proj_ba -> causal depthwise conv1d over q|k|v (with state) -> SiLU
      -> gated delta rule (q/k L2-normalised, beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias))
      -> per-head RMSNorm gated by SiLU(z) -> out_proj

Parameter names and layouts follow transformers' `Qwen3NextGatedDeltaNet`, so its weights load by name:
in_proj_qkvz rows are grouped per key head as [q (dk) | k (dk) | v (R*dv) | z (R*dv)] and in_proj_ba rows
as [b (R) | a (R)], with R = value heads per key head; value head h therefore reads key head h // R (the
"grouped" head map). The conv runs over the channels [all q | all k | all v].

The layer takes the packed batch of the engine (x [N, D], `Batch`) and keeps its per-sequence state in
the same two-tensor slot layout as a Mamba layer, returned by `state.mamba(layer_idx)`:
(conv_state [slots, conv_dim, conv_kernel - 1] in the activation dtype, recurrent_state
[slots, Hv, dk, dv] fp32); `state_shapes()` gives the per-slot shapes for a pool and `GatedDeltaCache` is a
minimal slot cache. Sequences with one new token and a saved state take the recurrent form (Triton on
CUDA); the others run together through the chunked form as one varlen batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gated_delta import gated_delta_chunked, gated_delta_recurrent
from .batch import Batch, State
from .linear import Linear

__all__ = ["GatedDeltaNetConfig", "GatedDeltaNet", "GatedHeadRMSNorm", "GatedDeltaCache", "packed_causal_conv1d"]


@dataclass
class GatedDeltaNetConfig:
    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    rms_norm_eps: float = 1e-6
    chunk_size: int = 64
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, config) -> "GatedDeltaNetConfig":
        """From a transformers Qwen3-Next-style config (its `linear_*` attributes)."""
        return cls(hidden_size=config.hidden_size, num_k_heads=config.linear_num_key_heads,
                   num_v_heads=config.linear_num_value_heads, head_k_dim=config.linear_key_head_dim,
                   head_v_dim=config.linear_value_head_dim, conv_kernel=config.linear_conv_kernel_dim,
                   rms_norm_eps=config.rms_norm_eps, hidden_act=getattr(config, "hidden_act", "silu"))


class GatedHeadRMSNorm(nn.Module):
    """RMSNorm over each head's dv channels (fp32), times the weight, then times SiLU(z).

    The normalised value is rounded to the activation dtype before the weight multiplies it, as in the
    Qwen3-Next reference, so bf16 runs round the same way."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        y32 = y.float()
        normed = (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + self.eps)).to(out_dtype)  # [..., dv]
        h = (self.weight.to(out_dtype) * normed).float() * F.silu(z.float())  # [..., dv]
        return h.to(out_dtype)


def packed_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_state: torch.Tensor | None, starts: list[int], lens: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over packed sequences, each continuing from its own window.

    x [N, C] (sequence i owns rows starts[i]:starts[i]+lens[i]); weight [C, W]; conv_state
    [n, C, W-1] (the previous W-1 inputs, oldest first; None = zeros). Returns (y [N, C] in x.dtype, no
    activation; new_state [n, C, W-1]). Sequences of any lengths (0 and 1 included) go in one pass: the
    windows and the new tokens form one table of rows, and each tap is one gather of N rows.
    """
    N, C = x.shape
    W = weight.shape[-1]
    n = len(lens)
    dev = x.device
    if conv_state is None:
        hist = x.new_zeros(n * (W - 1), C)  # [n*(W-1), C]
    else:
        hist = conv_state.to(x.dtype).transpose(1, 2).reshape(n * (W - 1), C)  # [n*(W-1), C]
    table = torch.cat([hist, x], 0)  # [n*(W-1) + N, C]: windows first, then the packed tokens
    starts_t = torch.tensor(starts, device=dev, dtype=torch.long)  # [n]
    lens_t = torch.tensor(lens, device=dev, dtype=torch.long)  # [n]

    def rows_of(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Table row of position pos (< 0: the window) of sequence seq."""
        return torch.where(pos < 0, seq * (W - 1) + (W - 1) + pos, n * (W - 1) + starts_t[seq] + pos)

    seq = torch.repeat_interleave(torch.arange(n, device=dev), lens_t)  # [N] sequence of each row
    pos = torch.arange(N, device=dev) - starts_t[seq]  # [N] position inside its sequence
    taps = rows_of(seq[:, None], pos[:, None] - (W - 1) + torch.arange(W, device=dev))  # [N, W]
    w = weight.to(x.dtype)  # [C, W]
    y = table[taps[:, W - 1]] * w[:, W - 1]  # [N, C]
    for m in range(W - 1):
        y.addcmul_(table[taps[:, m]], w[:, m])  # [N, C]
    if bias is not None:
        y = y + bias.to(x.dtype)
    last = lens_t[:, None] - (W - 1) + torch.arange(W - 1, device=dev)  # [n, W-1]
    new_state = table[rows_of(torch.arange(n, device=dev)[:, None], last)].transpose(1, 2)  # [n, C, W-1]
    return y, new_state


class GatedDeltaNet(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config if isinstance(config, GatedDeltaNetConfig) else GatedDeltaNetConfig.from_hf(config)
        if c.hidden_act not in ("silu", "swish"):
            raise ValueError(f"only a SiLU conv activation is supported, got {c.hidden_act!r}")
        if c.num_v_heads % c.num_k_heads:
            raise ValueError("num_v_heads must be a multiple of num_k_heads")
        self.config = c
        self.layer_idx = layer_idx
        self.hidden_size = c.hidden_size
        self.num_k_heads, self.num_v_heads = c.num_k_heads, c.num_v_heads
        self.head_k_dim, self.head_v_dim = c.head_k_dim, c.head_v_dim
        self.ratio = c.num_v_heads // c.num_k_heads
        self.key_dim = c.num_k_heads * c.head_k_dim
        self.value_dim = c.num_v_heads * c.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel = c.conv_kernel
        self.chunk_size = c.chunk_size
        self.in_proj_qkvz = Linear(c.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(c.hidden_size, 2 * c.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=c.conv_kernel, groups=self.conv_dim,
                                padding=c.conv_kernel - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(c.num_v_heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(c.num_v_heads).uniform_(1.0, 16.0)))
        self.norm = GatedHeadRMSNorm(c.head_v_dim, eps=c.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, c.hidden_size, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-slot shapes of (conv_state, recurrent_state); the recurrent state is kept in fp32."""
        return (self.conv_dim, self.conv_kernel - 1), (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def forward(self, x: torch.Tensor, batch: Batch, state: State | None) -> torch.Tensor:
        """x: [N, D] packed tokens -> [N, D]."""
        N = x.shape[0]
        hk, hv, dk, dv, r = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim, self.ratio
        qkvz = self.in_proj_qkvz(x).view(N, hk, 2 * dk + 2 * r * dv)  # [N, Hk, 2dk + 2R dv]
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)  # [N, Hk, dk] x2, [N, Hk, R dv] x2
        b, a = self.in_proj_ba(x).view(N, hk, 2 * r).split([r, r], dim=-1)  # [N, Hk, R] x2
        mixed = torch.cat([q.reshape(N, self.key_dim), k.reshape(N, self.key_dim),
                           v.reshape(N, self.value_dim)], dim=-1)  # [N, conv_dim]
        beta = b.reshape(N, hv).float().sigmoid()  # [N, Hv]
        g = -self.A_log.float().exp() * F.softplus(a.reshape(N, hv).float() + self.dt_bias.float())  # [N, Hv]

        n = batch.num_seqs
        starts, lens = batch.offsets[:-1], batch.seq_lens
        conv_w = self.conv1d.weight.squeeze(1)  # [conv_dim, W]
        if state is None:
            conv_state = rec_state = None
        else:
            conv_all, rec_all = state.mamba(self.layer_idx)
            fresh = [batch.slots[i] for i in range(n) if batch.context_lens[i] == 0]
            if fresh:  # a sequence without context starts from zeros, whatever its slot held before
                conv_all[fresh] = 0
                rec_all[fresh] = 0
            slots = torch.tensor(batch.slots, device=x.device)
            conv_state, rec_state = conv_all[slots], rec_all[slots]  # [n, conv_dim, W-1], [n, Hv, dk, dv]

        h, new_conv = packed_causal_conv1d(mixed, conv_w, self.conv1d.bias, conv_state, starts, lens)
        h = F.silu(h)  # [N, conv_dim]
        qc = h[:, : self.key_dim].unflatten(-1, (hk, dk))  # [N, Hk, dk] (strided view)
        kc = h[:, self.key_dim: 2 * self.key_dim].unflatten(-1, (hk, dk))  # [N, Hk, dk]
        vc = h[:, 2 * self.key_dim:].unflatten(-1, (hv, dv))  # [N, Hv, dv]

        dev = x.device
        core = torch.empty(N, hv, dv, dtype=x.dtype, device=dev)  # [N, Hv, dv]
        final = rec_state  # [n, Hv, dk, dv]: a gathered copy, updated per group below
        # one new token on top of a saved state: the recurrent form (Triton on CUDA); the rest, prefills
        # and multi-token continuations of any lengths: one varlen call of the chunked form
        one_token = [i for i in range(n) if lens[i] == 1] if state is not None else []
        rest = [i for i in range(n) if lens[i] != 1 or state is None]
        for seqs, recurrent in ((one_token, True), (rest, False)):
            if not seqs:
                continue
            whole = len(seqs) == n  # the group is the whole batch: views, no gathers
            rows = None if whole else torch.cat([torch.arange(starts[i], starts[i] + lens[i]) for i in seqs]).to(dev)
            sel = None if whole else torch.tensor(seqs, device=dev)
            args = [t if whole else t.index_select(0, rows) for t in (qc, kc, vc, g, beta)]  # [N', ...]
            init = rec_state if rec_state is None or whole else rec_state.index_select(0, sel)  # [n', Hv, dk, dv]
            if recurrent:
                o, st = gated_delta_recurrent(*(t.unsqueeze(1) for t in args),  # [n', 1, ...]: one token each
                                              initial_state=init, head_map="grouped", l2norm_qk=True)
            else:
                cu = torch.tensor([0] + [lens[i] for i in seqs], device=dev).cumsum(0)  # [n' + 1]
                o, st = gated_delta_chunked(*(t.unsqueeze(0) for t in args),  # [1, N', ...]: packed
                                            initial_state=init, head_map="grouped", l2norm_qk=True,
                                            cu_seqlens=cu, chunk_size=self.chunk_size)
            o = o.reshape(-1, hv, dv)  # [N', Hv, dv]
            if whole:
                core.copy_(o)
            else:
                core[rows] = o
            if final is not None:
                if whole:
                    final = st
                else:
                    final[sel] = st

        if state is not None:
            conv_all[slots] = new_conv.to(conv_all.dtype)
            rec_all[slots] = final.to(rec_all.dtype)
        out = self.norm(core, z.reshape(N, hv, dv), x.dtype)  # [N, Hv, dv]
        return self.out_proj(out.reshape(N, self.value_dim))


class GatedDeltaCache:
    """Slot cache for gated-delta layers: `mamba(layer)` -> (conv_state [B, conv_dim, W-1] in `dtype`,
    recurrent_state [B, Hv, dk, dv] fp32), the `State` methods these layers call."""

    def __init__(self, layers: Mapping[int, GatedDeltaNet] | Iterable[GatedDeltaNet], batch_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        items = layers.items() if isinstance(layers, Mapping) else ((m.layer_idx, m) for m in layers)
        self._states = {}
        for idx, layer in items:
            conv_shape, rec_shape = layer.state_shapes()
            self._states[idx] = (torch.zeros(batch_size, *conv_shape, dtype=dtype, device=device),
                                 torch.zeros(batch_size, *rec_shape, dtype=torch.float32, device=device))

    def mamba(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._states[layer]

    def kv_append(self, layer, slot, start, k, v):
        raise NotImplementedError("GatedDeltaCache holds no attention KV")
