"""ops.linear (oneDNN for large fp32 CPU products, F.linear otherwise) against a float64 product."""

import pytest
import torch

from hylm.ops import linear as linear_op
from hylm.ops.linear import linear, uses_onednn

native_available = __import__("hylm.ops.native", fromlist=["x"]).available()
needs_onednn = pytest.mark.skipif(linear_op._ONEDNN_LINEAR is None, reason="torch built without oneDNN")


def _reference(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@needs_onednn
@pytest.mark.parametrize("rows", [1, 4, 33, 300])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_path_matches_float64(rows, column_major, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1 << 11, 1 << 9, generator=g)  # 1M elements: the oneDNN path at any row count
    if column_major:
        w = w.t().contiguous().t()  # the loader's CPU layout
    b = torch.randn(w.shape[0], generator=g) if with_bias else None
    x = torch.randn(2, rows, w.shape[1], generator=g)  # [2, rows, in]
    # up to 8 rows over a column-major weight stream through the native kernels instead (rows.h)
    assert uses_onednn(x, w) == (not (column_major and 2 * rows <= linear_op.NATIVE_MAX_ROWS and native_available))
    y = linear(x, w, b)
    ref = _reference(x, w, b)
    assert y.shape == (2, rows, w.shape[0]) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_onednn
def test_onednn_sees_row_counts_in_buckets(monkeypatch):
    """Prompts of every length reach oneDNN as a bounded set of shapes (it keeps a primitive per shape): row
    counts above one bucket are padded with zero rows, and the padding never reaches the output."""
    seen = []
    original = linear_op._ONEDNN_LINEAR
    monkeypatch.setattr(linear_op, "_ONEDNN_LINEAR", lambda x, *a: seen.append(x.shape[0]) or original(x, *a))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 11, 1 << 9, generator=g)
    for rows in (65, 100, 127, 128, 129, 200, 1000):
        x = torch.randn(rows, w.shape[1], generator=g)
        y = linear(x, w)
        assert y.shape == (rows, w.shape[0])
        ref = _reference(x, w, None)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert seen == [128, 128, 128, 128, 192, 256, 1024]


@needs_onednn
def test_non_contiguous_input_and_batched_small_weight():
    w = torch.randn(256, 512)  # 128K elements: oneDNN only from ONEDNN_MIN_ROWS rows on
    x_few = torch.randn(4, 512)
    x_many = torch.randn(512, 600)[:, :512]  # a strided view
    assert not uses_onednn(x_few, w) and uses_onednn(x_many, w)
    for x in (x_few, x_many):
        ref = _reference(x, w, None)
        assert (linear(x, w).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_falls_back_where_onednn_does_not_apply():
    w = torch.randn(1 << 11, 1 << 9, requires_grad=True)
    x = torch.randn(3, 1 << 9)
    assert not uses_onednn(x, w)  # autograd needs a gradient of w
    linear(x, w).sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, x.sum(0).expand_as(w), atol=1e-5)
    with torch.no_grad():
        assert uses_onednn(x, w) or linear_op._ONEDNN_LINEAR is None
        assert not uses_onednn(x.bfloat16(), w.bfloat16())
        assert not uses_onednn(torch.empty(0, 1 << 9), w)
        assert linear(torch.empty(0, 1 << 9), w).shape == (0, 1 << 11)


needs_native = pytest.mark.skipif(not __import__("hylm.ops.native", fromlist=["x"]).available(),
                                  reason="no C compiler: native kernels not built")


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1664, 192), (100, 384), (384, 200), (203, 512), (300, 130), (5003, 67)])
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_rows_match_float64(rows, shape, column_major, with_bias):
    """The native few-row kernels (row-major and column-major weights, output counts and input sizes that are
    and aren't multiples of the vector tiles; column-major ones from 256 outputs on take the streaming order for
    one row, (5003, 67) with several runs per thread) against a float64 product."""
    g = torch.Generator().manual_seed(rows + shape[0])
    w = torch.randn(*shape, generator=g)
    if column_major:
        w = w.t().contiguous().t()
    b = torch.randn(shape[0], generator=g) if with_bias else None
    x = torch.randn(rows, shape[1], generator=g)
    assert linear_op.uses_native_rows(x, w, b) or (not column_major and w.numel() >= linear_op.NATIVE_MAX_WEIGHT)
    y = linear(x, w, b)
    ref = _reference(x, w, b)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_native_rows_route():
    w = torch.randn(1664, 192)
    assert not linear_op.uses_native_rows(torch.randn(9, 192), w, None)  # many rows: MKL / oneDNN
    assert not linear_op.uses_native_rows(torch.randn(2, 64), torch.randn(64, 64), None)  # tiny weight: MKL
    assert not linear_op.uses_native_rows(torch.randn(2, 192, dtype=torch.float64), w.double(), None)
    wg = w.clone().requires_grad_()
    assert not linear_op.uses_native_rows(torch.randn(2, 192), wg, None)  # autograd: F.linear


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_native_streaming_any_thread_count(monkeypatch, threads, packed):
    """The streaming order and the panels split outputs into one range per thread: uneven splits, more threads than
    cores."""
    monkeypatch.setattr(linear_op, "PACK_MAX_ELEMENTS", 1 << 22 if packed else 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        w = torch.randn(16411, 67, generator=g).t().contiguous().t()  # column-major, 1.1M: streamed up to 8 rows
        for rows in (1, 3, 8):
            x = torch.randn(rows, 67, generator=g)
            assert linear_op.uses_native_rows(x, w, None)
            ref = _reference(x, w, None)
            assert (linear(x, w).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("n, k", [(912, 192), (37, 5), (16, 64), (2048, 17)])
def test_panels_equal_the_column_major_kernels_bit_for_bit(n, k):
    """A column-major weight packed in panels of 16 outputs (rows.h, ROWS_PANELS; the last panel partly padding)
    gives the column-major kernels' results exactly, for every row count they serve (1-8 streamed, 9-64 tiled),
    and a float64 product's within fp32 rounding; outputs past N are never written."""
    lib = __import__("hylm.ops.native", fromlist=["x"]).library()
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).t().contiguous().t()  # [N, K] column-major
    panels = linear_op.packed_weight(w)
    assert panels.shape == (-(-n // 16), k, 16) and not panels.reshape(-1, 16)[-1, n % 16 or 16:].any()
    for rows in (1, 2, 3, 4, 5, 8, 9, 17, 64):
        x = torch.randn(rows, k, generator=g)
        column_major = torch.empty(rows, n)
        assert lib.hylm_linear_rows_t(x.data_ptr(), w.data_ptr(), None, column_major.data_ptr(), rows, k, n) == 0
        buffer = torch.full((rows * n + 16,), float("nan"))  # 16 guard entries after the output
        assert lib.hylm_linear_rows_panels(x.data_ptr(), panels.data_ptr(), None, buffer.data_ptr(), rows, k, n) == 0
        out = buffer[: rows * n].view(rows, n)
        assert torch.equal(out, column_major), rows
        assert buffer[rows * n:].isnan().all()
        ref = _reference(x, w, None)
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_native
def test_packed_weights_follow_updates_in_place():
    """One copy of a weight's panels, shared by linear() and the native plans, kept while the weight lives; an
    in-place update packs it again."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, 96, generator=g).t().contiguous().t()
    x = torch.randn(2, 96, generator=g)
    first = linear(x, w)
    panels = linear_op.native_weight(w)
    assert panels.layout == linear_op.PANELS and linear_op._packed[id(w)][2] is panels
    with torch.no_grad():
        w.mul_(2.0)
    torch.testing.assert_close(linear(x, w), 2 * first)
    assert linear_op.native_weight(w).tensor is not panels.tensor
    del w
    assert not any(ref() is not None and ref().shape == (400, 96) for ref, *_ in linear_op._packed.values())
