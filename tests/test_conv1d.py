"""Tests for the depthwise causal conv1d with rolling state."""

import pytest
import torch
import torch.nn.functional as F

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
