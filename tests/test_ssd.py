"""Tests for the Mamba-2 SSD ops against a float64 token-by-token reference."""

import pytest
import torch
import torch.nn.functional as F

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
