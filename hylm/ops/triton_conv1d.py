"""Triton kernels for the depthwise causal conv1d (see `conv1d` for the math and shapes).

Prefill: one program per (tile of BT tokens, block of BC channels). Each of the K taps is one [BT, BC]
load: a tap that falls before its sequence's first token reads that sequence's ``conv_state`` instead
(zero without one), so tiles are independent and a packed varlen row needs no padding. Each token finds
its sequence by a binary search over cu_seqlens on the device (no host sync). N extra programs (one per
sequence and channel block) write the new states: the last K-1 inputs, taken from the sequence and, for
one shorter than K-1, from its old state. Decode: one program per (row, channel block) loads the row's
[BC, K-1] window (the row of a state pool named by ``state_indices`` when given), writes the output and
shifts the window in place. Every input is read through its own strides, so views of a fused projection
or of a state pool need no copy; accumulation is fp32. Importing this module requires triton;
`conv1d.causal_conv1d` and `conv1d.causal_conv1d_step` dispatch here on CUDA tensors. Under
TRITON_INTERPRET=1 it also runs on CPU tensors (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["causal_conv1d_triton", "causal_conv1d_step_triton"]


@triton.jit
def _conv1d_prefill_kernel(
    x_ptr, w_ptr, bias_ptr, s0_ptr, o_ptr, sf_ptr, cu_ptr,
    T, C, N, n_tiles, t_tiles, search_steps,
    sx_b, sx_t, sx_c,
    sw_c, sw_k, sbias_c,
    s0_n, s0_c, s0_k,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK1: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_S0: tl.constexpr, SILU: tl.constexpr, VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    if pid < n_tiles:  # an output tile
        if VARLEN:  # one packed row; the tile may span several sequences
            b = pid * 0
            t = pid * BT + tl.arange(0, BT)
            # largest seq with cu[seq] <= t: the sequence owning t (empty sequences share its cu value
            # with the next one, so they are never chosen)
            lo = tl.zeros([BT], dtype=tl.int32)
            hi = lo + N
            for _ in range(search_steps):
                mid = (lo + hi) // 2
                go = tl.load(cu_ptr + mid) <= t
                lo = tl.where(go, mid, lo)
                hi = tl.where(go, hi, mid)
            seq = lo.to(tl.int64)
            start = tl.load(cu_ptr + seq).to(tl.int64)
        else:  # dense batch: row b is sequence b
            b = pid // t_tiles
            t = (pid % t_tiles) * BT + tl.arange(0, BT)
            seq = tl.zeros([BT], dtype=tl.int64) + b
            start = tl.zeros([BT], dtype=tl.int64)
        t = t.to(tl.int64)
        b = b.to(tl.int64)
        mt = t < T
        x_base = x_ptr + b * sx_b + offs_c[None, :] * sx_c
        s0_base = s0_ptr + seq[:, None] * s0_n + offs_c[None, :] * s0_c
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            p = t + (j - (K - 1))  # [BT] input position of tap j
            in_seq = p >= start
            m = (mt & in_seq)[:, None] & mc[None, :]
            v = tl.load(x_base + p[:, None] * sx_t, mask=m, other=0.0).to(tl.float32)
            if HAS_S0:  # taps before the sequence start read its window (index K-1 + (p - start) >= 0)
                ms = (mt & ~in_seq)[:, None] & mc[None, :]
                v += tl.load(s0_base + (K - 1 + p - start)[:, None] * s0_k, mask=ms, other=0.0).to(tl.float32)
            wj = tl.load(w_ptr + offs_c * sw_c + j * sw_k, mask=mc, other=0.0).to(tl.float32)
            acc += v * wj[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_c * sbias_c, mask=mc, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        # out is contiguous [B, T, C]
        po = o_ptr + (b * T + t)[:, None] * C + offs_c[None, :]
        tl.store(po, acc.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mc[None, :])
    else:  # the new state of one sequence: its last K-1 inputs, reaching into the old window if short
        n = (pid - n_tiles).to(tl.int64)
        if VARLEN:
            b = n * 0
            start = tl.load(cu_ptr + n).to(tl.int64)
            length = tl.load(cu_ptr + n + 1).to(tl.int64) - start
        else:
            b = n
            start = n * 0
            length = n * 0 + T
        k = tl.arange(0, BK1)
        mk = k < K - 1
        rel = length - (K - 1) + k  # [BK1] position inside the sequence of state slot k
        in_seq = rel >= 0
        m = (mk & in_seq)[:, None] & mc[None, :]
        px = x_ptr + b * sx_b + (start + rel)[:, None] * sx_t + offs_c[None, :] * sx_c
        v = tl.load(px, mask=m, other=0.0).to(tl.float32)
        if HAS_S0:
            ms = (mk & ~in_seq)[:, None] & mc[None, :]
            ps = s0_ptr + n * s0_n + offs_c[None, :] * s0_c + (K - 1 + rel)[:, None] * s0_k
            v += tl.load(ps, mask=ms, other=0.0).to(tl.float32)
        # new state is contiguous [N, C, K-1]
        pf = sf_ptr + n * (C * (K - 1)) + offs_c[None, :] * (K - 1) + k[:, None]
        tl.store(pf, v.to(sf_ptr.dtype.element_ty), mask=mk[:, None] & mc[None, :])


@triton.jit
def _conv1d_step_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, idx_ptr, o_ptr,
    C,
    sx_b, sx_c,
    sw_c, sw_k, sbias_c,
    ss_n, ss_c, ss_k,
    K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, SILU: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    if HAS_IDX:
        row = tl.load(idx_ptr + i).to(tl.int64)
    else:
        row = i
    k = tl.arange(0, BK)  # window slot: 0..K-2 the state (oldest first), K-1 the new token
    x_raw = tl.load(x_ptr + i * sx_b + offs_c * sx_c, mask=mc, other=0.0)
    xf = x_raw.to(tl.float32)
    s_base = s_ptr + row * ss_n + offs_c[:, None] * ss_c
    mstate = mc[:, None] & (k < K - 1)[None, :]
    win = tl.load(s_base + k[None, :] * ss_k, mask=mstate, other=0.0).to(tl.float32)  # [BC, BK]
    win = tl.where((k == K - 1)[None, :], xf[:, None], win)
    w = tl.load(w_ptr + offs_c[:, None] * sw_c + k[None, :] * sw_k, mask=mc[:, None] & (k < K)[None, :],
                other=0.0).to(tl.float32)
    acc = tl.sum(win * w, axis=1)  # [BC]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c * sbias_c, mask=mc, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(o_ptr + i * C + offs_c, acc.to(o_ptr.dtype.element_ty), mask=mc)

    # slot k takes slot k+1 (re-read in the state's dtype: the shift is exact), the last one takes x
    nxt = tl.load(s_base + (k + 1)[None, :] * ss_k, mask=mc[:, None] & (k + 1 < K - 1)[None, :], other=0.0)
    nxt = tl.where((k == K - 2)[None, :], x_raw.to(s_ptr.dtype.element_ty)[:, None], nxt)
    # a slot is stored by another thread than the one that read it: every read must land first
    tl.debug_barrier()
    tl.store(s_base + k[None, :] * ss_k, nxt, mask=mstate)


def _pad_strides(t: Optional[Tensor], n: int):
    return t.stride() if t is not None else (0,) * n


def causal_conv1d_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], silu: bool,
    block_t: Optional[int] = None, block_c: Optional[int] = None,
):
    """Same contract as `conv1d.causal_conv1d` (arguments already validated there)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    dev = x.device
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    out = torch.empty(B, T, C, dtype=x.dtype, device=dev)  # [B, T, C]
    new_state = torch.empty(N, C, K - 1, dtype=x.dtype, device=dev)  # [N, C, K-1]
    cu = (cu_seqlens.to(device=dev, dtype=torch.int32) if cu_seqlens is not None
          else torch.zeros(1, dtype=torch.int32, device=dev))
    BT = block_t or min(32, triton.next_power_of_2(max(T, 1)))
    BC = block_c or min(128, triton.next_power_of_2(C))
    t_tiles = triton.cdiv(T, BT)
    n_tiles = t_tiles if cu_seqlens is not None else B * t_tiles
    # the search range is [0, N): ceil(log2 N) halvings
    search_steps = max(N - 1, 0).bit_length()
    grid = (n_tiles + N, triton.cdiv(C, BC))
    if grid[0] > 0 and C > 0:
        _conv1d_prefill_kernel[grid](
            x, weight, bias if bias is not None else weight, conv_state if conv_state is not None else x,
            out, new_state, cu,
            T, C, N, n_tiles, t_tiles, search_steps,
            *x.stride(), *weight.stride(), *_pad_strides(bias, 1), *_pad_strides(conv_state, 3),
            K=K, BT=BT, BC=BC, BK1=triton.next_power_of_2(max(K - 1, 1)),
            HAS_BIAS=bias is not None, HAS_S0=conv_state is not None, SILU=bool(silu),
            VARLEN=cu_seqlens is not None,
            num_warps=4,
        )
    return out, new_state


def causal_conv1d_step_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Tensor,
    state_indices: Optional[Tensor], silu: bool, block_c: Optional[int] = None,
) -> Tensor:
    """Same contract as `conv1d.causal_conv1d_step` (arguments already validated there)."""
    B, C = x.shape
    K = weight.shape[-1]
    out = torch.empty(B, C, dtype=x.dtype, device=x.device)  # [B, C]
    BC = block_c or min(256, triton.next_power_of_2(C))
    grid = (B, triton.cdiv(C, BC))
    if B > 0 and C > 0:
        _conv1d_step_kernel[grid](
            x, weight, bias if bias is not None else weight, conv_state,
            state_indices if state_indices is not None else x, out,
            C,
            *x.stride(), *weight.stride(), *_pad_strides(bias, 1), *conv_state.stride(),
            K=K, BC=BC, BK=triton.next_power_of_2(K),
            HAS_BIAS=bias is not None, HAS_IDX=state_indices is not None, SILU=bool(silu),
            num_warps=4 if BC * triton.next_power_of_2(K) >= 1024 else 2,
        )
    return out
