"""Device functions shared by the Triton kernels (importing this module requires triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sequence_span(cu_ptr, n, T, VARLEN: tl.constexpr):
    """(first token, end token, batch row) of sequence n (int64): with VARLEN, tokens cu[n]:cu[n+1] of the
    one packed row, read on the device; otherwise all T tokens of row n."""
    if VARLEN:
        bos = tl.load(cu_ptr + n).to(tl.int64)
        eos = tl.load(cu_ptr + n + 1).to(tl.int64)
        b = n * 0
    else:
        bos = n * 0
        eos = bos + T
        b = n
    return bos, eos, b
