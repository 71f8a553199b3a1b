"""Tests for the depthwise causal conv1d with rolling state (torch paths, and the Triton kernels under the
interpreter)."""

import textwrap

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import needs_triton, run_under_interpreter

from hylm.ops.conv1d import causal_conv1d, causal_conv1d_step


def make_inputs(b=2, T=11, C=6, K=4, seed=0, with_state=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, C, generator=g)
    w = torch.randn(C, K, generator=g)
    bias = torch.randn(C, generator=g)
    st = torch.randn(b, C, K - 1, generator=g) if with_state else None
    return x, w, bias, st


def naive_conv(x, w, bias, state):
    """Float64 loop straight from the definition."""
    x, w = x.double(), w.double()
    b, T, C = x.shape
    K = w.shape[1]
    hist = torch.zeros(b, C, K - 1, dtype=torch.float64) if state is None else state.double().clone()
    out = torch.zeros(b, T, C, dtype=torch.float64)
    for t in range(T):
        window = torch.cat([hist, x[:, t, :, None]], dim=-1)  # [b, C, K]
        for c in range(C):
            acc = window[:, c, :] @ w[c]
            out[:, t, c] = acc + (bias[c].double() if bias is not None else 0.0)
        hist = window[:, :, 1:]
    return out, hist


@pytest.mark.parametrize("T", [1, 2, 3, 4, 11])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_naive(T, with_state, use_bias):
    x, w, bias, st = make_inputs(T=T, seed=T, with_state=with_state)
    bias = bias if use_bias else None
    out, new_state = causal_conv1d(x, w, bias, st)
    ref, ref_state = naive_conv(x, w, bias, st)
    assert out.shape == x.shape and new_state.shape == (2, 6, 3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_state.double(), ref_state)


def test_matches_torch_conv1d():
    for K in (2, 4):
        x, w, bias, _ = make_inputs(T=17, C=5, K=K, seed=40 + K)
        out, _ = causal_conv1d(x, w, bias)
        xt = F.pad(x.transpose(1, 2), (K - 1, 0))  # [b, C, T+K-1]
        ref = F.conv1d(xt, w.unsqueeze(1), bias, groups=x.shape[-1]).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [[1], [2, 5], [3, 3, 3], [1, 1, 1, 7], [10]])
def test_split_with_state_equals_one_shot(splits):
    x, w, bias, st = make_inputs(T=13, seed=5, with_state=True)
    full, full_state = causal_conv1d(x, w, bias, st)
    outs, state, start = [], st, 0
    for n in splits + [x.shape[1] - sum(splits)]:
        o, state = causal_conv1d(x[:, start : start + n], w, bias, state)
        outs.append(o)
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), full)
    torch.testing.assert_close(state, full_state)


def test_step_equals_one_shot():
    x, w, bias, st = make_inputs(T=9, seed=6, with_state=True)
    full, full_state = causal_conv1d(x, w, bias, st)
    state = st.clone()
    ptr = state.data_ptr()
    outs = [causal_conv1d_step(x[:, t], w, bias, state) for t in range(x.shape[1])]
    assert state.data_ptr() == ptr
    torch.testing.assert_close(torch.stack(outs, 1), full)
    torch.testing.assert_close(state, full_state)


def test_step_after_prefill_shorter_than_kernel():
    # prefill of 2 tokens (< K-1 = 3) from zero state, then decode steps
    x, w, bias, _ = make_inputs(T=8, seed=8)
    full, full_state = causal_conv1d(x, w, bias)
    o1, state = causal_conv1d(x[:, :2], w, bias)
    outs = [o1] + [causal_conv1d_step(x[:, t], w, bias, state)[:, None] for t in range(2, 8)]
    torch.testing.assert_close(torch.cat(outs, 1), full)
    torch.testing.assert_close(state, full_state)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_conv_states_after_each_equal_the_stepped_states(K):
    from hylm.ops.conv1d import conv_states_after_each

    g = torch.Generator().manual_seed(K)
    b, T, C = 2, 5, 6
    x, w = torch.randn(b, T, C, generator=g), torch.randn(C, K, generator=g)
    state = torch.randn(b, C, K - 1, generator=g)
    states = conv_states_after_each(x, state)
    assert states.shape == (b, T, C, K - 1)
    stepped = state.clone()
    for t in range(T):
        causal_conv1d_step(x[:, t], w, None, stepped)
        assert torch.equal(states[:, t], stepped)


# ---------------------------------------------------------------------------------------------------
# varlen prefill, state pool decode and fused SiLU (torch paths)
# ---------------------------------------------------------------------------------------------------

def naive_varlen(x, w, bias, state, lens):
    """float64 definition applied to each packed sequence separately: (out [1, T, C], states [n, C, K-1])."""
    outs, states, start = [], [], 0
    for i, n in enumerate(lens):
        st = state[i : i + 1] if state is not None else None
        o, s = naive_conv(x[:, start : start + n], w, bias, st)
        outs.append(o)
        states.append(s)
        start += n
    return torch.cat(outs, 1), torch.cat(states, 0)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_matches_each_sequence(K, with_state):
    lens = [5, 0, 1, 2, 7]  # an empty sequence and ones shorter than K-1
    g = torch.Generator().manual_seed(10 + K)
    C = 6
    x = torch.randn(1, sum(lens), C, generator=g)
    w, bias = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    st = torch.randn(len(lens), C, K - 1, generator=g) if with_state else None
    cu = torch.tensor([0] + lens).cumsum(0)
    out, new_state = causal_conv1d(x, w, bias, st, cu_seqlens=cu)
    ref, ref_state = naive_varlen(x, w, bias, st, lens)
    assert out.shape == x.shape and new_state.shape == (len(lens), C, K - 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_state.double(), ref_state)
    if with_state:  # the empty sequence keeps its window
        assert torch.equal(new_state[1], st[1])


def test_step_with_state_indices_updates_only_its_pool_rows():
    x, w, bias, _ = make_inputs(b=3, T=4, seed=12)
    g = torch.Generator().manual_seed(13)
    pool = torch.randn(7, 6, 3, generator=g)
    idx = torch.tensor([5, 0, 3])
    dense = pool[idx].clone()  # [3, C, K-1]
    before = pool.clone()
    for t in range(x.shape[1]):
        out = causal_conv1d_step(x[:, t], w, bias, pool, state_indices=idx)
        ref = causal_conv1d_step(x[:, t], w, bias, dense)
        torch.testing.assert_close(out, ref)
    assert torch.equal(pool[idx], dense)
    others = [r for r in range(7) if r not in idx.tolist()]
    assert torch.equal(pool[others], before[others])


def test_silu_flag_fuses_the_activation():
    x, w, bias, st = make_inputs(T=5, seed=14, with_state=True)
    out, new_state = causal_conv1d(x, w, bias, st, silu=True)
    ref, ref_state = causal_conv1d(x, w, bias, st)
    torch.testing.assert_close(out, F.silu(ref))
    torch.testing.assert_close(new_state, ref_state)
    s1, s2 = st.clone(), st.clone()
    torch.testing.assert_close(causal_conv1d_step(x[:, 0], w, bias, s1, silu=True),
                               F.silu(causal_conv1d_step(x[:, 0], w, bias, s2)))
    assert torch.equal(s1, s2)


def test_rejects_bad_arguments():
    x, w, bias, st = make_inputs(b=2, T=5, seed=15, with_state=True)
    with pytest.raises(ValueError, match="one packed row"):
        causal_conv1d(x, w, bias, st, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d(x[:1], w, bias, st, cu_seqlens=torch.tensor([0, 2, 3, 5]))
    with pytest.raises(ValueError, match="state_indices"):
        causal_conv1d_step(x[:, 0], w, bias, st, state_indices=torch.tensor([0]))
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, w, bias, st, backend="cuda")


def test_auto_backend_is_torch_on_cpu():
    import hylm.ops.conv1d as c
    assert c._use_triton("auto", torch.zeros(1)) is False


# ---------------------------------------------------------------------------------------------------
# Triton kernels, run by the interpreter on the CPU in a subprocess (TRITON_INTERPRET must be set before
# triton is imported, and must not leak into other tests)
# ---------------------------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent("""
    import torch, test_conv1d as t
    from hylm.ops.conv1d import causal_conv1d, causal_conv1d_step
    from hylm.ops.triton_conv1d import causal_conv1d_triton
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    cases = 0

    def close(a, b, what, tol=1e-5):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=lambda m: what + ": " + m)

    def prefill(name, x, w, bias, st, cu=None, silu=False, tol=1e-5, blocks=None):
        global cases
        if blocks is None:
            o, s = causal_conv1d(x, w, bias, st, cu_seqlens=cu, silu=silu, backend="triton")
        else:
            o, s = causal_conv1d_triton(x, w, bias, st, cu, silu, *blocks)
        if x.dtype == torch.bfloat16:  # against the float64 definition (the torch path sums in bf16)
            if cu is None:
                ro, rs = t.naive_conv(x, w, bias, st)
            else:
                ro, rs = t.naive_varlen(x, w, bias, st, (cu[1:] - cu[:-1]).tolist())
            ro = torch.nn.functional.silu(ro) if silu else ro
        else:
            ro, rs = causal_conv1d(x, w, bias, st, cu_seqlens=cu, silu=silu, backend="torch")
        assert o.dtype == x.dtype and s.dtype == x.dtype and s.shape == rs.shape, name
        close(o, ro, name + " out", tol)
        close(s, rs, name + " state", tol)
        cases += 1

    # dense: K 2 and 4, bias and state present or not, C = 200 (two channel blocks, the second partial),
    # T = 37 (two token tiles)
    for K in (2, 4):
        for use_bias in (False, True):
            for use_state in (False, True):
                x, w = rnd(2, 37, 200), rnd(200, K)
                bias = rnd(200) if use_bias else None
                st = rnd(2, 200, K - 1) if use_state else None
                prefill(f"K={K} bias={use_bias} state={use_state}", x, w, bias, st, silu=use_bias and use_state)
    # strided views: a slice of a fused projection, channel stride 2, batch-major transposed storage
    big = rnd(2, 9, 130)
    prefill("slice", big[..., 7:47], rnd(40, 4), rnd(40), rnd(2, 40, 3))
    prefill("channel stride", big[..., 1:81:2], rnd(40, 4), None, rnd(2, 3, 40).transpose(1, 2))
    prefill("time-major", rnd(9, 2, 40).transpose(0, 1), rnd(4, 40).t(), rnd(40), None)
    # varlen: an empty sequence, sequences shorter than K-1, one spanning several token tiles; small blocks
    # so tiles straddle sequence bounds
    lens = [5, 0, 1, 2, 9, 0]
    cu = torch.tensor([0] + lens).cumsum(0)
    for K in (2, 4):
        for use_state in (False, True):
            x, w, bias = rnd(1, sum(lens), 40), rnd(40, K), rnd(40)
            st = rnd(len(lens), 40, K - 1) if use_state else None
            prefill(f"varlen K={K} state={use_state}", x, w, bias, st, cu=cu, blocks=(4, 16))
    prefill("varlen default blocks", rnd(1, 17, 40), rnd(40, 4), None, rnd(6, 40, 3), cu=cu)
    # bf16 (fp32 accumulation)
    bf = lambda *s: rnd(*s).bfloat16()
    prefill("bf16", bf(2, 9, 40), bf(40, 4), bf(40), bf(2, 40, 3), tol=2e-2)
    prefill("bf16 varlen silu", bf(1, 17, 40), bf(40, 4), bf(40), bf(6, 40, 3), cu=cu, silu=True, tol=2e-2)

    # decode: in place on a dense state, or on pool rows named by unsorted state_indices
    def step(name, x, w, bias, st, idx=None, silu=False, tol=1e-5):
        global cases
        ref_st, before = st.clone(), st.clone()
        ptr = st.data_ptr()
        o = causal_conv1d_step(x, w, bias, st, state_indices=idx, silu=silu, backend="triton")
        if x.dtype == torch.bfloat16:
            rows = before if idx is None else before[idx]
            ro, rs = t.naive_conv(x[:, None], w, bias, rows)
            ro = (torch.nn.functional.silu(ro) if silu else ro)[:, 0]
            if idx is None:
                ref_st.copy_(rs)
            else:
                ref_st[idx] = rs.to(ref_st.dtype)
        else:
            ro = causal_conv1d_step(x, w, bias, ref_st, state_indices=idx, silu=silu, backend="torch")
        assert st.data_ptr() == ptr and o.dtype == x.dtype, name
        close(o, ro, name + " out", tol)
        assert torch.equal(st, ref_st), name + " state (other pool rows untouched)"
        cases += 1

    for K in (2, 4):
        for use_bias in (False, True):
            step(f"step K={K} bias={use_bias}", rnd(3, 300), rnd(300, K), rnd(300) if use_bias else None,
                 rnd(3, 300, K - 1), silu=use_bias)
    pool = rnd(7, 3, 40).transpose(1, 2)  # [slots, C, K-1] with channels fastest
    step("pool", rnd(4, 80)[:, 20:60], rnd(40, 4), rnd(40), pool, idx=torch.tensor([5, 0, 6, 2]))
    step("pool bf16", bf(3, 40), bf(40, 4), bf(40), bf(7, 40, 3), idx=torch.tensor([4, 1, 3]), silu=True,
         tol=2e-2)
    print("TRITON_OK", cases)
""")


@needs_triton
def test_triton_kernels_under_interpreter():
    run_under_interpreter(TRITON_SCRIPT, "TRITON_OK 24")
