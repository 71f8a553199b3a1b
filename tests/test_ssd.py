"""Tests for the Mamba-2 SSD ops against a float64 token-by-token reference."""

import itertools
import textwrap

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import needs_triton, run_under_interpreter

from hylm.ops.ssd import segsum, ssd_chunked, ssd_reference, ssd_step


def make_inputs(b=2, T=16, H=4, P=8, G=1, N=16, with_state=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g)
    dt = F.softplus(torch.randn(b, T, H, generator=g) - 2.0).clamp(1e-4, 10.0)
    A = -torch.exp(torch.randn(H, generator=g) * 0.5)
    B = torch.randn(b, T, G, N, generator=g)
    C = torch.randn(b, T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    s0 = torch.randn(b, H, P, N, generator=g) if with_state else None
    return x, dt, A, B, C, D, s0


def assert_close_scaled(actual, expected, rtol=1e-5):
    expected = expected.to(torch.float64)
    actual = actual.to(torch.float64)
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs err {err.item():.3e} > {rtol} * scale {scale.item():.3e}"


def test_segsum_matches_definition():
    torch.manual_seed(0)
    a = torch.randn(3, 6, dtype=torch.float64)
    s = segsum(a)
    for i in range(6):
        for j in range(6):
            if i >= j:
                torch.testing.assert_close(s[:, i, j], a[:, j + 1 : i + 1].sum(-1))
            else:
                assert torch.isinf(s[:, i, j]).all() and (s[:, i, j] < 0).all()


def test_reference_simple_scalar_case():
    # One head, P = N = 1, G = 1: closed-form scalar recurrence.
    x = torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1)
    dt = torch.tensor([0.5, 1.0, 0.25]).view(1, 3, 1)
    A = torch.tensor([-1.0])
    B = torch.tensor([2.0, 1.0, 3.0]).view(1, 3, 1, 1)
    C = torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1)
    D = torch.tensor([0.1])
    h, ys = 0.0, []
    import math

    for t in range(3):
        h = math.exp(dt[0, t, 0].item() * -1.0) * h + dt[0, t, 0].item() * x[0, t, 0, 0].item() * B[0, t, 0, 0].item()
        ys.append(h * C[0, t, 0, 0].item() + 0.1 * x[0, t, 0, 0].item())
    y, s = ssd_reference(x, dt, A, B, C, D)
    torch.testing.assert_close(y.flatten(), torch.tensor(ys, dtype=torch.float64))
    torch.testing.assert_close(s.flatten(), torch.tensor([h], dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 7, 8, 9, 16, 37])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(T, G, with_state):
    x, dt, A, B, C, D, s0 = make_inputs(T=T, G=G, with_state=with_state, seed=T * 10 + G)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D=D, initial_state=s0)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert s.shape == (2, 4, 8, 16) and s.dtype == torch.float32
    assert_close_scaled(y, y_ref)
    assert_close_scaled(s, s_ref)


def test_chunked_without_D_and_various_chunk_sizes():
    x, dt, A, B, C, _, s0 = make_inputs(T=21, G=2, H=6, with_state=True, seed=3)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, initial_state=s0)
    for cs in (1, 3, 5, 21, 64):
        y, s = ssd_chunked(x, dt, A, B, C, chunk_size=cs, initial_state=s0)
        assert_close_scaled(y, y_ref)
        assert_close_scaled(s, s_ref)


def test_chunked_lowprecision_inputs_computed_in_fp32():
    x, dt, A, B, C, D, _ = make_inputs(T=19, G=2, seed=4)
    xb, dtb, Bb, Cb = (t.to(torch.bfloat16) for t in (x, dt, B, C))
    y, s = ssd_chunked(xb, dtb, A, Bb, Cb, chunk_size=8, D=D)
    y_ref, s_ref = ssd_reference(xb, dtb, A, Bb, Cb, D=D)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close_scaled(y, y_ref)
    assert_close_scaled(s, s_ref)


def test_chunked_stable_with_strong_decay():
    # Large dt * |A| (very fast decay) must not produce inf/nan.
    x, dt, A, B, C, D, s0 = make_inputs(T=40, G=1, with_state=True, seed=5)
    dt = dt * 0 + 50.0
    A = A * 10
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=16, D=D, initial_state=s0)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D=D, initial_state=s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_close_scaled(y, y_ref)
    assert_close_scaled(s, s_ref)


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("split", [1, 3, 8, 13, 16, 29])
def test_chunked_split_equals_one_shot(G, split):
    T = 37
    x, dt, A, B, C, D, s0 = make_inputs(T=T, G=G, with_state=True, seed=7 + G)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0)
    y1, s1 = ssd_chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], 8, D=D, initial_state=s0)
    y2, s2 = ssd_chunked(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], 8, D=D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("G", [1, 2])
def test_step_matches_chunked(G):
    T = 13
    x, dt, A, B, C, D, s0 = make_inputs(T=T, G=G, with_state=True, seed=11 + G)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0)
    state = s0.clone()
    state_ptr = state.data_ptr()
    ys = []
    for t in range(T):
        ys.append(ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D))
    assert state.data_ptr() == state_ptr
    y_steps = torch.stack(ys, dim=1)
    assert y_steps.dtype == torch.float32
    torch.testing.assert_close(y_steps, y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_full, rtol=1e-5, atol=1e-5)
    # and against the float64 reference
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D=D, initial_state=s0)
    assert_close_scaled(y_steps, y_ref)
    assert_close_scaled(state, s_ref)


def test_step_after_prefill_without_D():
    T, split = 20, 11
    x, dt, A, B, C, _, _ = make_inputs(T=T, G=2, H=4, seed=21)
    _, state = ssd_chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], 4)
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t]) for t in range(split, T)]
    y_ref, s_ref = ssd_reference(x, dt, A, B, C)
    assert_close_scaled(torch.stack(ys, 1), y_ref[:, split:])
    assert_close_scaled(state, s_ref)


def test_group_mapping_is_contiguous_blocks():
    # With G groups, heads [g*R, (g+1)*R) must use group g's B/C: make group 1 zero
    # and check heads of group 1 produce only the D skip term.
    x, dt, A, B, C, D, _ = make_inputs(T=9, G=2, H=4, seed=31)
    B = B.clone()
    B[:, :, 1] = 0
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=4, D=D)
    torch.testing.assert_close(y[:, :, 2:], x[:, :, 2:] * D[2:, None])
    assert s[:, 2:].abs().max() == 0
    assert s[:, :2].abs().max() > 0


@pytest.mark.parametrize("t,groups", [(1, 1), (2, 2), (4, 2), (6, 3)])
def test_ssd_steps_keeps_every_state_of_the_float64_loop(t, groups):
    """ssd_steps (closed form, for speculative verification) vs the float64 token loop: outputs and the
    state after every position."""
    from hylm.ops.ssd import ssd_steps

    g = torch.Generator().manual_seed(t * 10 + groups)
    b, H, P, N = 2, 6, 5, 7
    x = torch.randn(b, t, H, P, generator=g)
    dt = torch.rand(b, t, H, generator=g) * 0.5
    A = -torch.rand(H, generator=g) * 2
    B, C = torch.randn(b, t, groups, N, generator=g), torch.randn(b, t, groups, N, generator=g)
    D = torch.randn(H, generator=g)
    h0 = torch.randn(b, H, P, N, generator=g)
    y, states = ssd_steps(h0, x, dt, A, B, C, D)
    assert y.shape == (b, t, H, P) and states.shape == (b, t, H, P, N)
    for j in range(t):
        y_ref, h_ref = ssd_reference(x[:, : j + 1], dt[:, : j + 1], A, B[:, : j + 1], C[:, : j + 1], D, h0)
        torch.testing.assert_close(states[:, j].double(), h_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[:, j].double(), y_ref[:, j], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# varlen prefill and state-pool decode on the torch path
# ---------------------------------------------------------------------------------------------------

def make_varlen_inputs(lens, H=4, P=8, G=2, N=8, with_state=True, seed=0):
    """One packed row of sequences with the given lengths; s0 is [len(lens), H, P, N] or None."""
    x, dt, A, B, C, D, _ = make_inputs(b=1, T=sum(lens), H=H, P=P, G=G, N=N, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    s0 = torch.randn(len(lens), H, P, N, generator=g) if with_state else None
    cu = torch.tensor([0, *itertools.accumulate(lens)])
    return x, dt, A, B, C, D, s0, cu


def varlen_reference(x, dt, A, B, C, D, s0, cu):
    """The float64 token loop run on each packed sequence on its own: (y [1, T, H, P], finals [n, H, P, N])."""
    bounds = cu.tolist()
    y = torch.zeros(x.shape, dtype=torch.float64)
    finals = []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        y[:, lo:hi], h = ssd_reference(x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi], D,
                                       None if s0 is None else s0[i: i + 1])
        finals.append(h)
    return y, torch.cat(finals)


@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_varlen_matches_each_sequence_alone(with_state):
    lens = [5, 0, 17, 9, 1]
    x, dt, A, B, C, D, s0, cu = make_varlen_inputs(lens, with_state=with_state, seed=41)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0, cu_seqlens=cu, backend="torch")
    assert y.shape == x.shape and y.dtype == torch.float32
    assert s.shape == (len(lens), 4, 8, 8) and s.dtype == torch.float32
    y_ref, s_ref = varlen_reference(x, dt, A, B, C, D, s0, cu)
    assert_close_scaled(y, y_ref)
    assert_close_scaled(s, s_ref)
    if with_state:  # the empty sequence passes its state through unchanged
        torch.testing.assert_close(s[1], s0[1], rtol=0, atol=0)


def test_chunked_varlen_rejects_bad_arguments():
    x, dt, A, B, C, D, s0, cu = make_varlen_inputs([3, 4], seed=42)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=s0[:1], cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd_chunked(x, dt, A, B, C, 8, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd_chunked(x, dt, A, B, C, 8, cu_seqlens=torch.tensor([0.0, 7.0]))
    x2, dt2, A2, B2, C2, *_ = make_inputs(b=2, T=7, G=2, N=8)
    with pytest.raises(ValueError, match="one packed row"):
        ssd_chunked(x2, dt2, A2, B2, C2, 8, cu_seqlens=cu)


def test_step_state_indices_updates_only_those_pool_rows():
    H, P, N, G = 4, 8, 8, 2
    x, dt, A, B, C, D, _ = make_inputs(b=3, T=1, H=H, P=P, G=G, N=N, seed=43)
    pool = torch.randn(6, H, P, N, generator=torch.Generator().manual_seed(44))
    before = pool.clone()
    slots = torch.tensor([4, 1, 3])
    y = ssd_step(pool, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D, state_indices=slots, backend="torch")
    for i, slot in enumerate(slots.tolist()):
        row = before[slot: slot + 1].clone()  # [1, H, P, N]
        y_i = ssd_step(row, x[i: i + 1, 0], dt[i: i + 1, 0], A, B[i: i + 1, 0], C[i: i + 1, 0], D=D)
        torch.testing.assert_close(y[i: i + 1], y_i, rtol=0, atol=0)
        torch.testing.assert_close(pool[slot: slot + 1], row, rtol=0, atol=0)
    for slot in (0, 2, 5):
        assert torch.equal(pool[slot], before[slot])


def test_step_rejects_bad_state_indices():
    x, dt, A, B, C, D, _ = make_inputs(b=2, T=1, N=8, seed=45)
    pool = torch.zeros(5, 4, 8, 8)
    with pytest.raises(ValueError, match="state_indices"):
        ssd_step(pool, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state_indices=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="rows"):
        ssd_step(pool, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])


def test_backend_argument():
    import hylm.ops.ssd as ssd

    assert ssd._use_triton("auto", torch.zeros(1)) is False
    x, dt, A, B, C, _, _ = make_inputs(b=1, T=3, N=8)
    with pytest.raises(ValueError, match="backend"):
        ssd_chunked(x, dt, A, B, C, 8, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# Triton kernels, run by the interpreter on the CPU in a subprocess (TRITON_INTERPRET must be set before
# triton is imported, and must not leak into other tests)
# ---------------------------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent("""
    import torch, test_ssd as t
    from hylm.ops.ssd import ssd_chunked, ssd_reference, ssd_step
    cases = 0

    def check(name, got, want, rtol=1e-5):
        global cases
        print("case", name, flush=True)
        assert got[0].dtype == got[1].dtype == torch.float32, name
        for g, w in zip(got, want):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            assert torch.isfinite(g).all(), name
            if w.numel():
                t.assert_close_scaled(g, w, rtol)
        cases += 1

    # dense prefill: T below / at / past chunk multiples, groups, D and initial state on and off,
    # P over several P blocks with N not a power of two
    for b, T, H, P, G, N, chunk, with_d, with_state in (
        (2, 37, 4, 8, 2, 8, 16, True, True), (2, 1, 4, 8, 1, 8, 8, False, False),
        (1, 40, 4, 8, 4, 8, 8, True, False), (1, 32, 4, 8, 1, 8, 16, False, True),
        (1, 20, 2, 40, 1, 20, 16, True, True),
    ):
        x, dt, A, B, C, D, s0 = t.make_inputs(b=b, T=T, H=H, P=P, G=G, N=N, with_state=with_state, seed=T + G)
        D = D if with_d else None
        got = ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_state=s0, backend="triton")
        check(f"dense T={T} G={G} P={P}", got, ssd_reference(x, dt, A, B, C, D, s0))

    # views of one fused projection (the model's layout), dt through a transposed copy
    x, dt, A, B, C, D, s0 = t.make_inputs(b=2, T=19, G=2, N=8, with_state=True, seed=5)
    fused = torch.cat([x.flatten(2), B.flatten(2), C.flatten(2), torch.randn(2, 19, 3)], -1)
    xv = fused[..., :32].unflatten(-1, (4, 8))  # [2, 19, 4, 8] view
    Bv, Cv = fused[..., 32:48].unflatten(-1, (2, 8)), fused[..., 48:64].unflatten(-1, (2, 8))  # [2, 19, 2, 8] views
    dtv = dt.transpose(0, 1).contiguous().transpose(0, 1)
    got = ssd_chunked(xv, dtv, A, Bv, Cv, 16, D=D, initial_state=s0, backend="triton")
    check("strided views", got, ssd_reference(x, dt, A, B, C, D, s0))

    # very fast decay stays finite; no tokens at all
    x, dt, A, B, C, D, s0 = t.make_inputs(b=1, T=40, with_state=True, N=8, seed=6)
    dt, A = dt * 0 + 50.0, A * 10
    check("strong decay", ssd_chunked(x, dt, A, B, C, 16, D=D, initial_state=s0, backend="triton"),
          ssd_reference(x, dt, A, B, C, D, s0))
    x, dt, A, B, C, D, s0 = t.make_inputs(b=2, T=0, N=8, with_state=True, seed=7)
    check("T=0", ssd_chunked(x, dt, A, B, C, 16, D=D, initial_state=s0, backend="triton"), (x.double(), s0))

    # bf16 inputs, computed in fp32 (the reference sees the same rounded inputs)
    x, dt, A, B, C, D, s0 = t.make_inputs(b=2, T=23, G=2, N=8, with_state=True, seed=8)
    x, dt, B, C = (v.to(torch.bfloat16) for v in (x, dt, B, C))
    check("bf16", ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=s0, backend="triton"),
          ssd_reference(x, dt, A, B, C, D, s0), rtol=1e-4)

    # varlen: unequal lengths, an empty sequence first and inside, a sequence longer than two chunks
    for lens, with_state, with_d, seed in (([7, 0, 23, 1], True, True, 9), ([0, 16, 21], False, False, 10)):
        x, dt, A, B, C, D, s0, cu = t.make_varlen_inputs(lens, with_state=with_state, seed=seed)
        D = D if with_d else None
        got = ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=s0, cu_seqlens=cu, backend="triton")
        check(f"varlen {lens}", got, t.varlen_reference(x, dt, A, B, C, D, s0, cu))
        torch_path = ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=s0, cu_seqlens=cu, backend="torch")
        check(f"varlen {lens} vs torch", got, torch_path)

    # decode: several steps of a dense batch against the float64 loop
    x, dt, A, B, C, D, s0 = t.make_inputs(b=3, T=5, G=2, N=8, with_state=True, seed=11)
    state = s0.clone()
    ys = torch.stack([ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D=D, backend="triton")
                      for i in range(5)], 1)
    check("step dense", (ys, state), ssd_reference(x, dt, A, B, C, D, s0))

    # decode into a pool by slot: unsorted, non-contiguous slots; the other rows stay bit-identical
    for dtype, idx_dtype, with_d, rtol in ((torch.float32, torch.int64, True, 1e-5),
                                           (torch.bfloat16, torch.int32, False, 1e-4)):
        x, dt, A, B, C, D, _ = t.make_inputs(b=3, T=1, G=2, N=8, seed=12)
        fused = torch.cat([x[:, 0].flatten(1), B[:, 0].flatten(1), C[:, 0].flatten(1)], -1).to(dtype)
        xv = fused[:, :32].unflatten(-1, (4, 8))  # [3, 4, 8] view
        Bv, Cv = fused[:, 32:48].unflatten(-1, (2, 8)), fused[:, 48:].unflatten(-1, (2, 8))  # [3, 2, 8] views
        D = D if with_d else None
        pool = torch.randn(7, 4, 8, 8)
        want_pool = pool.clone()
        slots = torch.tensor([5, 0, 3], dtype=idx_dtype)
        y = ssd_step(pool, xv, dt[:, 0].to(dtype), A, Bv, Cv, D=D, state_indices=slots, backend="triton")
        y_t = ssd_step(want_pool, xv, dt[:, 0].to(dtype), A, Bv, Cv, D=D, state_indices=slots, backend="torch")
        check(f"step pool {dtype}", (y, pool), (y_t, want_pool), rtol)
        untouched = [1, 2, 4, 6]
        assert torch.equal(pool[untouched], want_pool[untouched])
    print("TRITON_OK", cases)
""")


@needs_triton
def test_triton_ssd_under_interpreter():
    run_under_interpreter(TRITON_SCRIPT, "TRITON_OK 16")
