"""Whole pre-norm blocks for a few tokens in one native call (hylm/ops/csrc/decode_blocks.c): the attention block
x + o_proj(attention(rmsnorm(x))) over the paged KV cache, and RMSNorm rows. Decode steps, speculative
verification and MTP drafts are made of such blocks, each of which is otherwise dozens of PyTorch dispatches
for microseconds of arithmetic. References: `attention_block_reference`, `rmsnorm_reference`."""

from __future__ import annotations

import torch

from . import native
from .linear import fp32_cpu, linear, native_weight, weight_layout
from .paged_attention import _splits, paged_decode_reference

MAX_ROWS = 64  # new tokens per call (beyond, oneDNN/MKL products amortise their dispatch)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def rmsnorm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [R, D] fp32 on the CPU in one native call (`native_rmsnorm_ok` first) -> [R, D]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if native.library().hylm_rmsnorm_rows(x.data_ptr(), weight.data_ptr(), float(eps), x.shape[0], x.shape[1],
                                          out.data_ptr()) != 0:
        raise RuntimeError(f"native RMSNorm refused x {tuple(x.shape)}")
    return out


def native_rmsnorm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and fp32_cpu(x, weight) and weight.is_contiguous()
            and weight.shape[0] == x.shape[1] and native.available())


class NativeAttention:
    """One attention block's weights turned into `hylm_attention_rows` arguments once (see
    `prepare_native_attention`). Calling it stores the new tokens' k and v in the cache and returns the block's
    output x + o_proj(attention)."""

    def __init__(self, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                 wo: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        weights = [native_weight(w) for w in (wq, wk, wv, wo)]  # panels where that reads faster
        self.keep = (norm_weight, weights)  # alive while in use
        self.heads, self.kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self._kernel = native.library().hylm_attention_rows
        self._weights = (norm_weight.data_ptr(), float(eps),
                         *(v for w in weights for v in (w.tensor.data_ptr(), w.layout)), num_heads, num_kv_heads,
                         head_dim)
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, new_rows: torch.Tensor,
                 tables: torch.Tensor, lengths: torch.Tensor, block_size: int, longest: int) -> torch.Tensor:
        """x [N, D] fp32, one entry per new token: new_rows [N] its cache row, tables [N, w] its sequence's
        blocks (rows contiguous; one row expanded over all tokens is fine), lengths [N] the positions it sees (its
        own last); caches [Hkv, R, hd] fp32 contiguous. -> [N, D]"""
        x = x.contiguous()  # [N, D]
        out = torch.empty_like(x)  # [N, D]
        splits = self.splits(x.shape[0], longest)
        work = self.work(x.shape[0], splits)
        self.run(self.args(x, out, k_cache, v_cache, new_rows, tables, lengths, block_size, splits, work))
        return out

    def splits(self, n: int, longest: int) -> int:
        """Ranges each (token, KV head) splits its positions into (see paged_attention._splits)."""
        return _splits(n, self.kv_heads, longest)

    def work(self, n: int, splits: int) -> torch.Tensor:
        """Scratch for n tokens in `splits` ranges each (a forward's attention blocks of one shape can share it)."""
        return torch.empty(n * self.kv_heads * splits * (self.group * self.head_dim + 2 * self.group))

    def args(self, x: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             new_rows: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, block_size: int, splits: int,
             work: torch.Tensor) -> tuple:
        """The kernel's arguments for `__call__`'s inputs (x contiguous, out [N, D] not x, work from `work`), for
        `run`."""
        if tables.stride(1) != 1:
            raise ValueError("block tables must be contiguous along each row")
        # the kernel reads token n's table at tables + n * stride: a row shared by all tokens has stride 0
        return (x.data_ptr(), x.shape[0], x.shape[1], *self._weights, k_cache.data_ptr(), v_cache.data_ptr(),
                k_cache.shape[1], new_rows.data_ptr(), tables.data_ptr(), tables.stride(0), lengths.data_ptr(),
                block_size, self.scale, splits, work.data_ptr(), out.data_ptr())

    def run(self, args: tuple) -> None:
        rc = self._kernel(*args)
        if rc != 0:
            raise RuntimeError(f"native attention block refused {args[1]} tokens (code {rc})")


def prepare_native_attention(norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, wk: torch.Tensor,
                             wv: torch.Tensor, wo: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                             scale: float) -> NativeAttention | None:
    """A NativeAttention for these fp32 CPU weights (row- or column-major), or None where the kernel can't run
    them (another dtype or device, strided weights, head sizes the paged kernel has no code for)."""
    from .paged_attention import native_supported

    weights = (wq, wk, wv, wo)
    if not (fp32_cpu(norm_weight, *weights) and norm_weight.is_contiguous()
            and all(w.dim() == 2 and weight_layout(w) is not None for w in weights)):
        return None
    if not native_supported(torch.device("cpu"), torch.float32, torch.float32, num_heads // num_kv_heads, head_dim):
        return None
    return NativeAttention(norm_weight, eps, wq, wk, wv, wo, num_heads, num_kv_heads, head_dim, scale)


def attention_block_reference(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor,
                              wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, num_heads: int,
                              num_kv_heads: int, head_dim: int, scale: float, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, new_rows: torch.Tensor, tables: torch.Tensor,
                              lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """`NativeAttention` as PyTorch ops (what the model's Block computes on its other paths)."""
    n = x.shape[0]
    h = rmsnorm_reference(x, norm_weight, eps)
    q = linear(h, wq).view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [N, Hkv, g, hd]
    k = linear(h, wk).view(n, num_kv_heads, head_dim)  # [N, Hkv, hd]
    v = linear(h, wv).view(n, num_kv_heads, head_dim)
    k_cache[:, new_rows] = k.transpose(0, 1).to(k_cache.dtype)  # [Hkv, N, hd]
    v_cache[:, new_rows] = v.transpose(0, 1).to(v_cache.dtype)
    out = paged_decode_reference(q, k_cache, v_cache, tables, lengths, block_size, scale)  # [N, Hkv, g, hd]
    return x + linear(out.reshape(n, -1).to(x.dtype), wo)
