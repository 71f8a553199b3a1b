"""Triton weight-only NVFP4 GEMM: y = x @ W^T (+ bias) with W kept packed (see `nvfp4` for the format).

For GPUs without FP4 tensor cores (Hopper): one program per (block of BLOCK_N output features, block of
BLOCK_M rows of x). It walks K in blocks of BLOCK_K (a multiple of 16, so every run of 16 elements shares
one scale), loads BLOCK_K/2 packed bytes per output feature, decodes the low and high nibbles (E2M1) and
their E4M3 block scales arithmetically in registers and feeds the products E2M1 * scale to tl.dot with an
fp32 accumulator. Those products have at most 5 significant bits, so they are exact in TF32, and so are
bf16 and fp16 activations: for 16-bit x the dot runs on TF32 tensor cores with exact products (the same
sums as the fp32 torch path, up to order); for fp32 x it runs in full fp32 ("ieee"). Operands stay fp32
rather than bf16 also because the interpreter cannot run a bf16 tl.dot. Low nibbles hold the even columns
of W and high nibbles the odd ones, so each K block is two dots: x's even columns with the low nibbles,
x's odd columns with the high nibbles; no interleaving of the decoded halves is needed. The global scale
(read from device memory: no host sync) multiplies the accumulator once, then the bias is added, as in
`nvfp4.nvfp4_linear`. Every tensor is read through its own strides. Importing this module requires
triton; `nvfp4.nvfp4_linear` dispatches here on CUDA tensors. Under TRITON_INTERPRET=1 it also runs on
CPU tensors (tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["nvfp4_linear_triton"]


@triton.jit
def _e2m1_value(code):
    """4-bit codes (int32 0..15) -> fp32 values."""
    mag = code & 7
    # magnitude = (1.m) * 2^(e-1) with e = mag >> 1, m = mag & 1, so twice it is the integer
    # (2 + m) << (e - 1); e = 0 is the subnormal pair 0 and 0.5, whose twice is mag itself
    twice = tl.where(mag < 2, mag, (2 | (mag & 1)) << tl.maximum((mag >> 1) - 1, 0))
    val = twice.to(tl.float32) * 0.5
    return tl.where(code >= 8, -val, val)  # -0.0 for code 8, as an IEEE decode gives


@triton.jit
def _e4m3_value(bits):
    """E4M3 (fn) bytes as int32 0..255 -> fp32 values (0x7F / 0xFF are NaN)."""
    mag = bits & 0x7F
    exp = mag >> 3
    man = mag & 7
    # normal: place exponent and mantissa in an fp32 and rebias (7 -> 127); built from bits rather than
    # exp2 so it is exact on every GPU; subnormal (exp 0): man * 2^-9
    normal = ((mag << 20) + ((127 - 7) << 23)).to(tl.float32, bitcast=True)
    val = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    val = tl.where(mag == 0x7F, float("nan"), val)
    return tl.where(bits >= 0x80, -val, val)


@triton.jit
def _nvfp4_linear_kernel(
    x_ptr, p_ptr, s_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K,
    sx_m, sx_k,
    sp_n, sp_k,
    ss_n, ss_k,
    sy_m, sy_n, sb_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_m = tl.program_id(1)
    BLOCK_KH: tl.constexpr = BLOCK_K // 2  # packed bytes per row per K block
    offs_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_KH)  # byte j of the block holds columns 2j (low) and 2j+1 (high)
    mm = offs_m < M
    mn = offs_n < N
    KH = K // 2

    x_rows = x_ptr + offs_m[:, None] * sx_m  # [BLOCK_M, 1]
    p_cols = p_ptr + offs_n[None, :] * sp_n  # [1, BLOCK_N]: W^T tiles, K along rows
    s_cols = s_ptr + offs_n[None, :] * ss_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh0 in range(0, KH, BLOCK_KH):
        jh = kh0 + offs_j  # [BLOCK_KH] byte index along the row
        mj = jh < KH
        xm = mm[:, None] & mj[None, :]
        # masked columns read x = 0 and code 0 / scale 0, so they add exactly nothing
        # x_even, x_odd [BLOCK_M, BLOCK_KH]: the columns met by the low and by the high nibbles
        x_even = tl.load(x_rows + (2 * jh)[None, :] * sx_k, mask=xm, other=0.0).to(tl.float32)
        x_odd = tl.load(x_rows + (2 * jh + 1)[None, :] * sx_k, mask=xm, other=0.0).to(tl.float32)
        wm = mj[:, None] & mn[None, :]
        byte = tl.load(p_cols + jh[:, None] * sp_k, mask=wm, other=0).to(tl.int32)  # [BLOCK_KH, BLOCK_N]
        # columns 2j and 2j+1 both sit in block (2j) // 16 = j // 8; the 8 repeated addresses per block
        # are served by one cache line, and decoding a byte costs a few integer ops
        sbits = tl.load(s_cols + (jh // 8)[:, None] * ss_k, mask=wm, other=0).to(tl.int32)
        scale = _e4m3_value(sbits)
        w_lo = _e2m1_value(byte & 15) * scale  # exact: E2M1 (<= 2 significant bits) * E4M3 (<= 4)
        w_hi = _e2m1_value(byte >> 4) * scale
        acc = tl.dot(x_even, w_lo, acc, input_precision=PRECISION)
        acc = tl.dot(x_odd, w_hi, acc, input_precision=PRECISION)

    y = acc * tl.load(g_ptr).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n * sb_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * sy_m + offs_n[None, :] * sy_n
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def nvfp4_linear_triton(
    x: Tensor, packed: Tensor, scales: Tensor, global_scale: float | Tensor, bias: Optional[Tensor] = None,
    block_m: Optional[int] = None, block_n: Optional[int] = None, block_k: Optional[int] = None,
) -> Tensor:
    """x [M, in] (any strides), packed uint8 [out, in/2], scales float8_e4m3fn (or its uint8 bits)
    [out, in/16], global scale (float or 1-element tensor), bias [out] or None -> [M, out] in x's dtype.

    Same contract as `nvfp4.nvfp4_linear` for 2-D x (shapes already validated there). block_*: tile
    sizes (powers of two, block_m and block_n >= 16, block_k >= 32); None picks them from the shapes.
    """
    M, K = x.shape
    N = packed.shape[0]
    dev = x.device
    y = torch.empty(M, N, dtype=x.dtype, device=dev)  # [M, N]
    if M == 0 or N == 0:
        return y
    # TF32 holds every bf16 / fp16 value and every decoded weight exactly; fp32 x needs full fp32
    exact_in_tf32 = x.dtype in (torch.bfloat16, torch.float16)
    xk = x if exact_in_tf32 or x.dtype == torch.float32 else x.float()
    sbits = scales.view(torch.uint8) if scales.dtype != torch.uint8 else scales  # same bytes, loadable as ints
    if isinstance(global_scale, Tensor):
        g = global_scale.to(device=dev, dtype=torch.float32).reshape(1)  # [1]
    else:
        g = torch.full((1,), float(global_scale), dtype=torch.float32, device=dev)  # a fill, not a copy
    b = bias if bias is not None else g  # dummy pointer when absent
    BM = block_m or (16 if M <= 16 else 32 if M <= 32 else 64)
    BN = block_n or (32 if M <= 16 else 64)  # small M: narrower tiles, more programs to cover the SMs
    BK = block_k or 128
    if BK % 32 or BM < 16 or BN < 16:
        raise ValueError(f"bad NVFP4 tile sizes {BM}, {BN}, {BK}: block_k must be a multiple of 32 "
                         f"(two nibble halves of >= 16) and block_m, block_n >= 16")
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    _nvfp4_linear_kernel[grid](
        xk, packed, sbits, g, b, y,
        M, N, K,
        *xk.stride(), *packed.stride(), *sbits.stride(), *y.stride(), b.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        PRECISION="tf32" if exact_in_tf32 else "ieee", HAS_BIAS=bias is not None,
        num_warps=4,
    )
    return y
