"""The native paged decode-attention kernel against a float64 softmax over the gathered rows."""

import pytest
import torch

from hylm.ops import native
from hylm.ops import paged_attention as pa

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: native kernels not built")


def float64_attention(q, k_cache, v_cache, tables, lengths, block_size, scale):
    """A loop over sequences and query heads in float64, straight from the definition."""
    b, h, g, d = q.shape
    out = torch.empty(b, h, g, d, dtype=torch.float64)
    for i in range(b):
        rows = [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(int(lengths[i]))]
        for j in range(h):
            keys, values = k_cache[j, rows].double(), v_cache[j, rows].double()  # [L, hd]
            for r in range(g):
                weights = torch.softmax(keys @ q[i, j, r].double() * scale, 0)  # [L]
                out[i, j, r] = weights @ values
    return out


def random_case(seed, batch, heads, group, head_dim, block_size, lengths, consecutive=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lengths)
    num_blocks = batch * width + 3
    order = torch.arange(num_blocks) if consecutive else torch.randperm(num_blocks, generator=gen)
    tables = order[: batch * width].view(batch, width)
    k_cache = (torch.randn(heads, num_blocks * block_size, head_dim, generator=gen) * 2).to(dtype)
    v_cache = torch.randn(heads, num_blocks * block_size, head_dim, generator=gen).to(dtype)
    q = torch.randn(batch, heads, group, head_dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lengths)


@needs_native
@pytest.mark.parametrize("heads,group,head_dim,block_size,lengths,consecutive", [
    (2, 2, 48, 16, [1, 17, 300, 1029], False),   # hylm-tiny's heads; scattered blocks
    (2, 2, 48, 16, [2000], True),                # one long sequence in consecutive blocks (tiles span blocks)
    (1, 1, 64, 4, [5, 1, 130], False),           # no grouping, tiny blocks
    (4, 8, 128, 64, [700, 129], True),           # Super-like head size, blocks longer than a tile
    (2, 16, 40, 8, [333, 90], False),            # the widest group; a head size with no specialised copy
    (3, 3, 36, 16, [97, 13], False),             # head size not a multiple of 8: scalar score path
])
def test_native_kernel_matches_float64(heads, group, head_dim, block_size, lengths, consecutive, monkeypatch):
    for min_split in (pa.MIN_SPLIT, 16):  # one range per (sequence, head), and many merged ranges
        monkeypatch.setattr(pa, "MIN_SPLIT", min_split)
        q, kc, vc, tables, lens = random_case(len(lengths), len(lengths), heads, group, head_dim, block_size,
                                              lengths, consecutive)
        scale = head_dim ** -0.5
        out = pa.paged_decode_attention(q, kc, vc, tables, lens, block_size, scale, backend="native")
        ref = float64_attention(q, kc, vc, tables, lens, block_size, scale)
        assert out.dtype == torch.float32 and out.shape == q.shape
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


@needs_native
def test_native_kernel_reads_a_bf16_cache():
    q, kc, vc, tables, lens = random_case(7, 2, 2, 4, 64, 16, [500, 77], dtype=torch.bfloat16)
    out = pa.paged_decode_attention(q, kc, vc, tables, lens, 16, 0.125, backend="native")
    torch.testing.assert_close(out.double(), float64_attention(q, kc, vc, tables, lens, 16, 0.125),
                               rtol=1e-5, atol=2e-6)


def test_torch_reference_matches_float64():
    q, kc, vc, tables, lens = random_case(3, 3, 2, 2, 48, 4, [9, 1, 40])
    out = pa.paged_decode_attention(q, kc, vc, tables, lens, 4, 0.2, backend="torch")
    torch.testing.assert_close(out.double(), float64_attention(q, kc, vc, tables, lens, 4, 0.2),
                               rtol=1e-5, atol=2e-6)


@needs_native
def test_native_kernel_refuses_bad_inputs():
    q, kc, vc, tables, lens = random_case(1, 2, 2, 2, 48, 16, [40, 20])
    with pytest.raises(ValueError, match="positions"):
        pa.paged_decode_attention(q, kc, vc, tables, torch.tensor([40, 0]), 16, 0.1, backend="native")
    with pytest.raises(ValueError, match="positions"):  # more positions than the table covers
        pa.paged_decode_attention(q, kc, vc, tables, torch.tensor([40, 10_000]), 16, 0.1, backend="native")
    with pytest.raises(RuntimeError, match="not available"):  # fp16 caches are not read natively
        pa.paged_decode_attention(q, kc.half(), vc.half(), tables, lens, 16, 0.1, backend="native")


def test_native_build_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("HYLM_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.available()
        q, kc, vc, tables, lens = random_case(2, 1, 2, 2, 48, 16, [30])
        out = pa.paged_decode_attention(q, kc, vc, tables, lens, 16, 0.1)  # auto falls back to PyTorch
        torch.testing.assert_close(out.double(), float64_attention(q, kc, vc, tables, lens, 16, 0.1),
                                   rtol=1e-5, atol=2e-6)
    finally:
        native.library.cache_clear()
