"""Triton kernel for the recurrent gated delta rule (see `gated_delta` for the math and shapes).

One program per (sequence, value head, block of BV value columns). The program keeps its [K, BV] slice
of the state in registers in fp32 and walks the sequence token by token: load q/k (its key head), v,
beta and the gate, decay, delta update, output. Every input is read through its own strides, so views
of a fused projection need no copy; packed varlen sequences read their bounds from cu_seqlens on the
device (no host sync). Importing this module requires triton; `gated_delta.gated_delta_recurrent`
dispatches here on CUDA tensors. Under TRITON_INTERPRET=1 it also runs on CPU tensors (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_common import sequence_span

Tensor = torch.Tensor

__all__ = ["gated_delta_recurrent_triton"]


@triton.jit
def _gated_delta_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, o_ptr, s0_ptr, sf_ptr, sa_ptr, cu_ptr,
    T, HV, R, HK, scale, eps,
    sq_b, sq_t, sq_h, sq_k,
    sk_b, sk_t, sk_h, sk_k,
    sv_b, sv_t, sv_h, sv_v,
    sg_b, sg_t, sg_h, sg_k,
    sb_b, sb_t, sb_h,
    s0_n, s0_h, s0_k, s0_v,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KDA: tl.constexpr, GROUPED: tl.constexpr, L2: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_ALL: tl.constexpr, VARLEN: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    n = (i_nh // HV).to(tl.int64)
    h = i_nh % HV
    if GROUPED:
        hk = h // R
    else:
        hk = h % HK
    bos, eos, b = sequence_span(cu_ptr, n, T, VARLEN)

    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < K
    mv = offs_v < V
    mkv = mk[:, None] & mv[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        p0 = s0_ptr + n * s0_n + h * s0_h + offs_k[:, None] * s0_k + offs_v[None, :] * s0_v
        state += tl.load(p0, mask=mkv, other=0.0).to(tl.float32)

    # contiguous outputs: o [B, T, HV, V]; all states [B, T, HV, K, V]
    q_base = q_ptr + b * sq_b + hk * sq_h + offs_k * sq_k
    k_base = k_ptr + b * sk_b + hk * sk_h + offs_k * sk_k
    v_base = v_ptr + b * sv_b + h * sv_h + offs_v * sv_v
    g_base = g_ptr + b * sg_b + h * sg_h
    b_base = b_ptr + b * sb_b + h * sb_h
    o_base = o_ptr + (b * T * HV + h) * V + offs_v
    sa_base = sa_ptr + (b * T * HV + h) * (K * V) + offs_k[:, None] * V + offs_v[None, :]

    for t in range(bos, eos):
        q = tl.load(q_base + t * sq_t, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_base + t * sk_t, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * sv_t, mask=mv, other=0.0).to(tl.float32)
        if L2:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + eps)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + eps)
        q = q * scale
        if KDA:
            gk = tl.load(g_base + t * sg_t + offs_k * sg_k, mask=mk, other=0.0).to(tl.float32)
            state = state * tl.exp(gk)[:, None]
        else:
            gs = tl.load(g_base + t * sg_t).to(tl.float32)
            state = state * tl.exp(gs)
        if HAS_BETA:
            beta = tl.load(b_base + t * sb_t).to(tl.float32)
        else:
            beta = 1.0
        pred = tl.sum(state * k[:, None], axis=0)  # [BV]: S^T k
        u = (v - pred) * beta
        state = state + k[:, None] * u[None, :]
        o = tl.sum(state * q[:, None], axis=0)  # [BV]
        tl.store(o_base + t * (HV * V), o.to(o_ptr.dtype.element_ty), mask=mv)
        if STORE_ALL:
            tl.store(sa_base + t * (HV * K * V), state, mask=mkv)

    pf = sf_ptr + (n * HV + h) * (K * V) + offs_k[:, None] * V + offs_v[None, :]
    tl.store(pf, state, mask=mkv)


def gated_delta_recurrent_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Optional[Tensor], scale: float,
    initial_state: Optional[Tensor], head_map: str, l2norm_qk: bool, return_all_states: bool,
    cu_seqlens: Optional[Tensor], block_v: Optional[int] = None,
):
    """Same contract as `gated_delta.gated_delta_recurrent` (arguments already validated there)."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    kda = g.dim() == 4
    dev = q.device
    out = torch.empty(B, T, HV, V, dtype=q.dtype, device=dev)  # [B, T, HV, V]
    final = torch.empty(N, HV, K, V, dtype=torch.float32, device=dev)  # [N, HV, K, V]
    every = (torch.empty(B, T, HV, K, V, dtype=torch.float32, device=dev) if return_all_states
             else final)  # [B, T, HV, K, V] (a dummy pointer when not stored)
    s0 = initial_state if initial_state is not None else final  # dummy pointer when absent
    bt = beta if beta is not None else g  # dummy pointer when absent
    cu = (cu_seqlens.to(device=dev, dtype=torch.int32) if cu_seqlens is not None
          else torch.zeros(1, dtype=torch.int32, device=dev))
    BK = triton.next_power_of_2(K)
    BV = block_v or min(triton.next_power_of_2(V), 32 if BK <= 128 else 16)
    gs = g.stride()
    grid = (triton.cdiv(V, BV), N * HV)
    if N * HV > 0:
        _gated_delta_recurrent_kernel[grid](
            q, k, v, g, bt, out, s0, final, every, cu,
            T, HV, HV // HK, HK, float(scale), 1e-6,
            *q.stride(), *k.stride(), *v.stride(),
            gs[0], gs[1], gs[2], gs[3] if kda else 0,
            *bt.stride()[:3],
            *s0.stride(),
            K=K, V=V, BK=BK, BV=BV,
            KDA=kda, GROUPED=head_map == "grouped", L2=bool(l2norm_qk), HAS_BETA=beta is not None,
            HAS_S0=initial_state is not None, STORE_ALL=bool(return_all_states), VARLEN=cu_seqlens is not None,
            num_warps=4 if BK * BV >= 4096 else 2,
        )
    if return_all_states:
        return out, final, every
    return out, final
