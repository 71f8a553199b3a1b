"""Triton fused routed experts (see `moe.grouped_expert_mlp` for the math and shapes).

The N*k (token, expert) assignments are sorted by expert on the device; each expert's run of sorted rows
is cut into blocks of BM rows, and a small block table (expert, first row, end row) is built with torch
ops that never read a value back to the host, so the grid is an upper bound (cdiv(N*k, BM) + E blocks)
and blocks past the last expert's end exit at once. Kernel 1 is a grouped GEMM over those blocks:
h = relu(x[token] @ up[e]^T)^2 with the activation applied in registers before h is stored (sorted rows,
x's dtype). Kernel 2 is a grouped GEMM y = h @ down[e]^T times the routing weight, stored in fp32 at the
assignment's own index t*k + j, so that the combine is a plain sum over each token's k rows with no
atomics. Every GEMM accumulates in fp32; x, up and down are read through their own strides. Importing
this module requires triton; `moe.grouped_expert_mlp` dispatches here on CUDA tensors. Under
TRITON_INTERPRET=1 it also runs on CPU tensors (tests); there bf16 tiles are widened to fp32 before tl.dot,
because the interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

__all__ = ["fused_moe_triton"]


@triton.jit
def _moe_up_kernel(
    x_ptr, up_ptr, h_ptr, blk_ptr, src_ptr,
    n_blocks, D, I, TOP_K,
    sx_t, sx_d,
    su_e, su_i, su_d,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, F32_DOT: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    row_start = tl.load(blk_ptr + n_blocks + i_m)
    row_end = tl.load(blk_ptr + 2 * n_blocks + i_m)
    if row_start >= row_end:  # past the last expert's blocks (the grid is an upper bound)
        return
    expert = tl.load(blk_ptr + i_m).to(tl.int64)

    rows = row_start + tl.arange(0, BM)
    mr = rows < row_end
    src = tl.load(src_ptr + rows, mask=mr, other=0)  # [BM] assignment index t*k + j
    tok = (src // TOP_K).to(tl.int64)
    offs_n = i_n * BN + tl.arange(0, BN)
    mn = offs_n < I
    offs_d = tl.arange(0, BK)

    a_ptrs = x_ptr + tok[:, None] * sx_t + offs_d[None, :] * sx_d  # [BM, BK]
    b_ptrs = up_ptr + expert * su_e + offs_n[None, :] * su_i + offs_d[:, None] * su_d  # [BK, BN]: up[e]^T
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BK):
        md = d0 + offs_d < D
        a = tl.load(a_ptrs, mask=mr[:, None] & md[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=md[:, None] & mn[None, :], other=0.0).to(a.dtype)
        if F32_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK * sx_d
        b_ptrs += BK * su_d
    acc = tl.maximum(acc, 0.0)
    h = acc * acc
    # h: [N*k, I] contiguous, sorted rows
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mr[:, None] & mn[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, down_ptr, y_ptr, gate_ptr, blk_ptr, src_ptr,
    n_blocks, I, D_OUT, TOP_K,
    sd_e, sd_o, sd_i,
    sg_t, sg_k,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, F32_DOT: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    row_start = tl.load(blk_ptr + n_blocks + i_m)
    row_end = tl.load(blk_ptr + 2 * n_blocks + i_m)
    if row_start >= row_end:
        return
    expert = tl.load(blk_ptr + i_m).to(tl.int64)

    rows = row_start + tl.arange(0, BM)
    mr = rows < row_end
    src = tl.load(src_ptr + rows, mask=mr, other=0)  # [BM] assignment index t*k + j
    offs_n = i_n * BN + tl.arange(0, BN)
    mn = offs_n < D_OUT
    offs_i = tl.arange(0, BK)

    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * I + offs_i[None, :]  # [BM, BK]
    b_ptrs = down_ptr + expert * sd_e + offs_n[None, :] * sd_o + offs_i[:, None] * sd_i  # [BK, BN]: down[e]^T
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i0 in range(0, I, BK):
        mi = i0 + offs_i < I
        a = tl.load(a_ptrs, mask=mr[:, None] & mi[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mi[:, None] & mn[None, :], other=0.0).to(a.dtype)
        if F32_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK
        b_ptrs += BK * sd_i
    gate = tl.load(gate_ptr + (src // TOP_K).to(tl.int64) * sg_t + (src % TOP_K) * sg_k, mask=mr, other=0.0)
    y = acc * gate.to(tl.float32)[:, None]
    # y: [N*k, D_out] fp32 in assignment order, each row written by exactly one block
    y_ptrs = y_ptr + src.to(tl.int64)[:, None] * D_OUT + offs_n[None, :]
    tl.store(y_ptrs, y, mask=mr[:, None] & mn[None, :])


def _tile(n: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16; shorter extents are padded by masks
    return max(16, min(cap, triton.next_power_of_2(n)))


def _block_table(flat_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """Sort the assignments by expert and cut each expert's rows into blocks of block_m, on the device.

    Returns (order [N*k] int32: the assignment index of each sorted row, table [3, n_blocks] int32: expert,
    first row and end row of each block, n_blocks). n_blocks is an upper bound known without reading any
    count back: each expert with rows adds at most one partial block, and blocks past the last one are empty.
    """
    nk = flat_ids.numel()
    dev = flat_ids.device
    sorted_ids, order = torch.sort(flat_ids, stable=True)  # [N*k] each
    experts = torch.arange(num_experts, device=dev, dtype=sorted_ids.dtype)
    # expert e owns sorted rows seg_start[e]:seg_end[e] (bincount would read its size back on CUDA)
    seg_start = torch.searchsorted(sorted_ids, experts)  # [E]
    seg_end = torch.searchsorted(sorted_ids, experts, right=True)  # [E]
    n_blk = (seg_end - seg_start + block_m - 1) // block_m  # [E]
    blk_end = n_blk.cumsum(0)  # [E]
    n_blocks = triton.cdiv(nk, block_m) + min(num_experts, nk)
    b = torch.arange(n_blocks, device=dev)  # [n_blocks]
    owner = torch.searchsorted(blk_end, b, right=True)  # [n_blocks], E past the last block
    e = owner.clamp(max=num_experts - 1)
    first = seg_start[e] + (b - (blk_end[e] - n_blk[e])) * block_m
    end = torch.where(owner < num_experts, seg_end[e], first)  # empty blocks past the end
    table = torch.stack([e, first, end]).to(torch.int32)  # [3, n_blocks]
    return order.to(torch.int32), table, n_blocks


def fused_moe_triton(x: Tensor, weights: Tensor, ids: Tensor, up: Tensor, down: Tensor,
                     block_m: int | None = None) -> Tensor:
    """Same contract as `moe.grouped_expert_mlp`: x [N, D]; weights, ids [N, k]; up [E, I, D];
    down [E, D_out, I]. Returns [N, D_out] in x's dtype."""
    n, top_k = ids.shape
    num_experts, inter, d_in = up.shape
    d_out = down.shape[1]
    dev = x.device
    nk = n * top_k
    if nk == 0:
        return torch.zeros(n, d_out, dtype=x.dtype, device=dev)
    # rows per block from the mean load per expert: decode gives most experts one row, prefill many
    bm = block_m or _tile(triton.cdiv(nk, num_experts), 64)
    order, table, n_blocks = _block_table(ids.reshape(-1), num_experts, bm)
    # fp32 follows torch's matmul setting, so the two backends agree on tf32 (off by default)
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    # CPU tensors reach a Triton kernel only under the interpreter, whose bf16 tl.dot is wrong (see above)
    f32_dot = x.device.type == "cpu" and x.dtype == torch.bfloat16

    h = torch.empty(nk, inter, dtype=x.dtype, device=dev)  # [N*k, I] sorted rows
    bn, bk = _tile(inter, 64), _tile(d_in, 64)
    _moe_up_kernel[(n_blocks, triton.cdiv(inter, bn))](
        x, up, h, table, order,
        n_blocks, d_in, inter, top_k,
        *x.stride(), *up.stride(),
        BM=bm, BN=bn, BK=bk, PRECISION=precision, F32_DOT=f32_dot, num_warps=4,
    )
    y = torch.empty(nk, d_out, dtype=torch.float32, device=dev)  # [N*k, D_out] assignment order
    bn, bk = _tile(d_out, 64), _tile(inter, 64)
    _moe_down_kernel[(n_blocks, triton.cdiv(d_out, bn))](
        h, down, y, weights, table, order,
        n_blocks, inter, d_out, top_k,
        *down.stride(), *weights.stride(),
        BM=bm, BN=bn, BK=bk, PRECISION=precision, F32_DOT=f32_dot, num_warps=4,
    )
    return y.view(n, top_k, d_out).sum(1).to(x.dtype)  # [N, D_out]
