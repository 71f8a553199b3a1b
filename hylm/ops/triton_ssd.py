"""Triton kernels for the Mamba-2 SSD scan (see `ssd` for the math and shapes).

Prefill (`ssd_chunked_triton`): one program per (sequence, head, block of BP head-dim rows). The program
keeps its [BP, N] slice of the state in registers in fp32 and walks its sequence one chunk of BQ tokens
at a time: the intra-chunk outputs are (C B^T o decay) @ (x dt) with the causal decay exp(cs_i - cs_j)
built from the chunk's cumulative log decays cs, the carried state adds (C @ state^T) exp(cs_i), and the
state moves to the chunk end as state exp(cs_last) + (x dt exp(cs_last - cs))^T @ B. All three products
are tl.dot; every exponent is <= 0, so nothing overflows whatever dt * A is. Tokens past the end of the
sequence are loaded with dt = 0 and x = B = 0 (no decay, no input), so the final state is exact.

Decode (`ssd_step_triton`): one program per (batch row, head, block of BP head-dim rows) updating its
[BP, N] state slice in place, optionally in the pool row named by state_indices (no gather/scatter).

Every input is read through its own strides, so views of a fused projection need no copy; packed varlen
sequences read their bounds from cu_seqlens on the device (no host sync). Importing this module requires
triton; `ssd.ssd_chunked` and `ssd.ssd_step` dispatch here on CUDA tensors. Under TRITON_INTERPRET=1 it
also runs on CPU tensors (tests).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import sequence_span

Tensor = torch.Tensor

__all__ = ["ssd_chunked_triton", "ssd_step_triton"]

# Every tl.dot takes fp32 operands (16-bit inputs are widened on load). "ieee" keeps fp32 products (the
# torch path's accuracy); "tf32x3" is the faster tensor-core alternative with nearly fp32 accuracy on
# NVIDIA GPUs. (Under TRITON_INTERPRET a bf16 tl.dot multiplies the raw bits, so 16-bit operands could
# not be tested on the CPU either.)
DOT_PRECISION = "ieee"


@triton.jit
def _ssd_chunked_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, s0_ptr, y_ptr, sf_ptr, cu_ptr,
    T, H, R,
    sx_b, sx_t, sx_h, sx_p,
    sdt_b, sdt_t, sdt_h,
    sb_b, sb_t, sb_g, sb_n,
    sc_b, sc_t, sc_g, sc_n,
    sa_h, sd_h,
    s0_n, s0_h, s0_p, s0_s,
    P: tl.constexpr, N: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, HAS_S0: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_nh = tl.program_id(1)
    n = (i_nh // H).to(tl.int64)
    h = i_nh % H
    g = h // R
    bos, eos, b = sequence_span(cu_ptr, n, T, VARLEN)

    offs_q = tl.arange(0, BQ)
    offs_p = i_p * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    causal = offs_q[:, None] >= offs_q[None, :]  # [BQ, BQ]
    is_last = offs_q == BQ - 1  # [BQ]

    a = tl.load(a_ptr + h * sa_h).to(tl.float32)
    if HAS_D:
        d = tl.load(d_ptr + h * sd_h).to(tl.float32)
    state = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_S0:
        p0 = s0_ptr + n * s0_n + h * s0_h + offs_p[:, None] * s0_p + offs_n[None, :] * s0_s
        state += tl.load(p0, mask=mp[:, None] & mn[None, :], other=0.0).to(tl.float32)

    x_base = x_ptr + b * sx_b + h * sx_h + offs_p[None, :] * sx_p  # [1, BP]
    dt_base = dt_ptr + b * sdt_b + h * sdt_h
    b_base = b_ptr + b * sb_b + g * sb_g + offs_n[None, :] * sb_n  # [1, BN]
    c_base = c_ptr + b * sc_b + g * sc_g + offs_n[None, :] * sc_n  # [1, BN]
    # contiguous output y [b, T, H, P]
    y_base = y_ptr + (b * T * H + h) * P + offs_p[None, :]  # [1, BP]

    for c0 in range(bos, eos, BQ):
        t = c0 + offs_q  # [BQ]
        mt = t < eos
        mtp = mt[:, None] & mp[None, :]
        mtn = mt[:, None] & mn[None, :]
        dt = tl.load(dt_base + t * sdt_t, mask=mt, other=0.0).to(tl.float32)  # [BQ]
        cs = tl.cumsum(dt * a, axis=0)  # [BQ]: log decay from the chunk start to each token
        cs_last = tl.sum(tl.where(is_last, cs, 0.0), axis=0)
        x = tl.load(x_base + t[:, None] * sx_t, mask=mtp, other=0.0).to(tl.float32)  # [BQ, BP]
        bm = tl.load(b_base + t[:, None] * sb_t, mask=mtn, other=0.0).to(tl.float32)  # [BQ, BN]
        cm = tl.load(c_base + t[:, None] * sc_t, mask=mtn, other=0.0).to(tl.float32)  # [BQ, BN]
        xdt = x * dt[:, None]  # [BQ, BP]

        cb = tl.dot(cm, tl.trans(bm), input_precision=DOT_PRECISION)  # [BQ, BQ]
        # -inf above the diagonal before exp: those exponents are positive and could overflow
        decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))  # [BQ, BQ]
        y = tl.dot(cb * decay, xdt, input_precision=DOT_PRECISION)  # [BQ, BP]
        y_prev = tl.dot(cm, tl.trans(state), input_precision=DOT_PRECISION)  # [BQ, BP]: C . carried state
        y += y_prev * tl.exp(cs)[:, None]
        if HAS_D:
            y += x * d
        tl.store(y_base + t[:, None] * (H * P), y, mask=mtp)

        to_end = tl.exp(cs_last - cs)  # [BQ]
        state = state * tl.exp(cs_last) + tl.dot(tl.trans(xdt * to_end[:, None]), bm,
                                                 input_precision=DOT_PRECISION)  # [BP, BN]

    pf = sf_ptr + ((n * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]  # contiguous [n_seqs, H, P, N]
    tl.store(pf, state, mask=mp[:, None] & mn[None, :])


@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, y_ptr, idx_ptr,
    H, R,
    ss_b, ss_h, ss_p, ss_n,
    sx_b, sx_h, sx_p,
    sdt_b, sdt_h,
    sb_b, sb_g, sb_n,
    sc_b, sc_g, sc_n,
    sa_h, sd_h,
    P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, HAS_IDX: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i = (i_bh // H).to(tl.int64)
    h = i_bh % H
    g = h // R
    if HAS_IDX:
        slot = tl.load(idx_ptr + i).to(tl.int64)
    else:
        slot = i

    offs_p = i_p * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]

    ps = state_ptr + slot * ss_b + h * ss_h + offs_p[:, None] * ss_p + offs_n[None, :] * ss_n  # [BP, BN]
    s = tl.load(ps, mask=mpn, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + h * sa_h).to(tl.float32)
    dt = tl.load(dt_ptr + i * sdt_b + h * sdt_h).to(tl.float32)
    x = tl.load(x_ptr + i * sx_b + h * sx_h + offs_p * sx_p, mask=mp, other=0.0).to(tl.float32)  # [BP]
    bv = tl.load(b_ptr + i * sb_b + g * sb_g + offs_n * sb_n, mask=mn, other=0.0).to(tl.float32)  # [BN]
    cv = tl.load(c_ptr + i * sc_b + g * sc_g + offs_n * sc_n, mask=mn, other=0.0).to(tl.float32)  # [BN]

    s = s * tl.exp(dt * a) + (x * dt)[:, None] * bv[None, :]
    tl.store(ps, s.to(state_ptr.dtype.element_ty), mask=mpn)
    y = tl.sum(s * cv[None, :], axis=1)  # [BP]
    if HAS_D:
        y += x * tl.load(d_ptr + h * sd_h).to(tl.float32)
    # contiguous output y [b, H, P]
    tl.store(y_ptr + (i * H + h) * P + offs_p, y, mask=mp)


def _dot_block(size: int, cap: int) -> int:
    # tl.dot needs every dimension to be at least 16 on the GPU
    return max(16, min(triton.next_power_of_2(size), cap))


def ssd_chunked_triton(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
    initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Same contract as `ssd.ssd_chunked` (arguments already validated there).

    The result does not depend on the chunk size, so the kernel's chunk is chunk_size rounded to a
    power of two in [16, 64]: larger tiles would not fit the registers next to the [BP, N] state.
    """
    b, T, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    n_seqs = b if cu_seqlens is None else cu_seqlens.numel() - 1
    dev = x.device
    y = torch.empty(b, T, H, P, dtype=torch.float32, device=dev)  # [b, T, H, P]
    final = torch.empty(n_seqs, H, P, N, dtype=torch.float32, device=dev)  # [n_seqs, H, P, N]
    s0 = initial_state if initial_state is not None else final  # dummy pointer when absent
    d = D if D is not None else A  # dummy pointer when absent
    cu = (cu_seqlens.to(device=dev, dtype=torch.int32) if cu_seqlens is not None
          else torch.zeros(1, dtype=torch.int32, device=dev))
    BQ = _dot_block(chunk_size, 64)
    BN = _dot_block(N, 1 << 30)
    BP = _dot_block(P, 32)
    grid = (triton.cdiv(P, BP), n_seqs * H)
    if n_seqs * H > 0:
        _ssd_chunked_kernel[grid](
            x, dt, A, B, C, d, s0, y, final, cu,
            T, H, H // G,
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
            A.stride(0), d.stride(0),
            *s0.stride(),
            P=P, N=N, BQ=BQ, BP=BP, BN=BN,
            HAS_D=D is not None, HAS_S0=initial_state is not None, VARLEN=cu_seqlens is not None,
            DOT_PRECISION=DOT_PRECISION,
            num_warps=8 if BQ * BN >= 4096 else 4,
        )
    return y, final


def ssd_step_triton(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    state_indices: Optional[Tensor],
) -> Tensor:
    """Same contract as `ssd.ssd_step` (arguments already validated there); updates ``state`` in place."""
    b, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    dev = x.device
    y = torch.empty(b, H, P, dtype=torch.float32, device=dev)  # [b, H, P]
    d = D if D is not None else A  # dummy pointer when absent
    idx = state_indices.to(dev) if state_indices is not None else y  # dummy pointer when absent
    BN = triton.next_power_of_2(N)
    BP = min(triton.next_power_of_2(P), max(1, 4096 // BN))
    grid = (triton.cdiv(P, BP), b * H)
    if b * H > 0:
        _ssd_step_kernel[grid](
            state, x, dt, A, B, C, d, y, idx,
            H, H // G,
            *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
            A.stride(0), d.stride(0),
            P=P, N=N, BP=BP, BN=BN,
            HAS_D=D is not None, HAS_IDX=state_indices is not None,
            num_warps=4 if BP * BN >= 2048 else 2,
        )
    return y
