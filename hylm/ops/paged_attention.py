"""Decode attention over a paged KV cache: one new query token per sequence, grouped query heads.

The cache is head-major, k and v [Hkv, R, hd]: position p of a sequence lives in row
table[p // block_size] * block_size + p % block_size of every head. `paged_decode_attention` runs the native
C kernel (hylm/ops/csrc/paged_decode.c) on CPU tensors when it is built, else the PyTorch reference, which
gathers the rows and runs one masked softmax.
"""

from __future__ import annotations

import math

import torch

from . import native

# Ranges of at least this many positions per thread: shorter ones cost more in merging than they save.
MIN_SPLIT = 512


def native_supported(device: torch.device, q_dtype: torch.dtype, kv_dtype: torch.dtype, group: int,
                     head_dim: int) -> bool:
    """Whether the native kernel runs this case: fp32 queries on the CPU, an fp32 or bf16 cache, at most 16
    query heads per KV head, head_dim <= 512, and the kernel built."""
    return (torch.device(device).type == "cpu" and q_dtype == torch.float32
            and kv_dtype in (torch.float32, torch.bfloat16) and group <= 16 and head_dim <= 512
            and native.available())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float,
                           backend: str = "auto", longest: int | None = None) -> torch.Tensor:
    """q [B, Hkv, G, hd] (the G query heads that read each KV head), caches [Hkv, R, hd], block_tables
    [B, max_blocks] int64, lengths [B] int64 (positions attended, >= 1). -> [B, Hkv, G, hd] in q's dtype.
    backend: "auto" (native where supported), "native" or "torch". longest: max(lengths) when the caller
    knows it and vouches for the inputs (the engine's state pool: skips reading the lengths back to check them)."""
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be auto, native or torch, got {backend!r}")
    supported = native_supported(q.device, q.dtype, k_cache.dtype, q.shape[2], q.shape[3])
    use_native = backend == "native" or (backend == "auto" and supported)
    if backend == "native" and not supported:
        raise RuntimeError("the native paged decode kernel is not available for these inputs")
    if not use_native:
        return paged_decode_reference(q, k_cache, v_cache, block_tables, lengths, block_size, scale)
    return _native(q, k_cache, v_cache, block_tables, lengths, block_size, scale, longest)


def _splits(batch: int, heads: int, longest: int) -> int:
    """Ranges per (sequence, KV head): enough work items to keep every thread busy, none shorter than
    MIN_SPLIT positions."""
    threads = torch.get_num_threads()
    want = math.ceil(4 * threads / max(1, batch * heads))
    return max(1, min(want, math.ceil(longest / MIN_SPLIT)))


def _native(q, k_cache, v_cache, block_tables, lengths, block_size, scale, longest=None) -> torch.Tensor:
    b, h, g, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or k_cache.shape[0] != h:
        raise ValueError(f"caches must both be [{h}, R, {d}] of one dtype, got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the caches must be contiguous")
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = lengths.to(torch.int64).contiguous()
    if longest is None:  # an outside caller: check what the kernel will index with
        longest = int(lens.max()) if b else 0
        if b and (int(lens.min()) < 1 or tables.shape[1] * block_size < longest):
            raise ValueError("every sequence needs 1..max_blocks * block_size positions")
    out = torch.empty_like(q)
    if b == 0:
        return out
    splits = _splits(b, h, longest)
    work = torch.empty(b * h * splits, g * d + 2 * g, dtype=torch.float32)
    rc = native.library().hylm_paged_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
        k_cache.shape[1], tables.data_ptr(), tables.shape[1], lens.data_ptr(), b, h, g, d, block_size,
        float(scale), splits, work.data_ptr(), out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"native paged decode kernel refused shapes q={tuple(q.shape)}")
    return out


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float
                           ) -> torch.Tensor:
    """The same in PyTorch: gather every sequence's rows (padded to the longest), mask, softmax in fp32 (or
    float64 for float64 inputs)."""
    b, h, g, d = q.shape
    longest = int(lengths.max()) if b else 0
    pos = torch.arange(longest, device=q.device)  # [L]
    tables = block_tables.to(device=q.device, dtype=torch.long)
    blocks = tables[:, (pos // block_size).clamp(max=tables.shape[1] - 1)]  # [B, L]
    rows = blocks * block_size + pos % block_size  # [B, L]
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; float64 where a test asks for it
    keys = k_cache[:, rows].to(dtype).permute(1, 0, 2, 3)  # [Hkv, B, L, hd] -> [B, Hkv, L, hd]
    values = v_cache[:, rows].to(dtype).permute(1, 0, 2, 3)
    scores = torch.einsum("bhgd,bhld->bhgl", q.to(dtype), keys) * scale  # [B, Hkv, G, L]
    valid = pos[None, :] < lengths.to(q.device)[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", torch.softmax(scores, -1), values).to(q.dtype)
